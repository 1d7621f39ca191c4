"""Scoring a trained ranker against features read from the feature store.

A ranker folder holds `ranker.safetensors` (parameters only), `ranker.json` (config, pinned codebook version,
label prior, history length) and `vocab.json` (training item ids in ID-row order). At scoring time the item
tables (aligned vector, text-tower vector where the ranker reads it, SIDs,
ID row) are built for just the rows a request touches, from the online store
pinned to the ranker's codebook version, and handed to the model's forward (no shared state per request)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from semalign.errors import DamagedFileError, InvalidInputError, reading

RANKER_FILES = ("ranker.safetensors", "ranker.json", "vocab.json")


class ScoringError(InvalidInputError):
    """A scoring request that cannot be answered as given."""


def save_ranker(model, folder: Path, meta: dict, vocab: list[str]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffers = {n for n, _ in model.named_buffers()}
    params = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in buffers}
    save_file(params, str(folder / "ranker.safetensors"))
    (folder / "ranker.json").write_text(json.dumps({**meta, "config": asdict(model.cfg)}, indent=2, default=float))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder


class RankerScorer:
    def __init__(self, folder: Path, settings=None, store=None):
        import torch
        from safetensors.torch import load_file

        from semalign.models.ranker import SID_ROWS, ItemTables, Ranker, RankerConfig

        folder = Path(folder)
        missing = [f for f in RANKER_FILES if not (folder / f).exists()]
        if missing:
            raise DamagedFileError(folder, f"{folder}: not a ranker folder (missing {missing})")
        with reading(folder / "ranker.json"):  # not JSON, or a configuration the model refuses
            self.meta = json.loads((folder / "ranker.json").read_text())
            cfg = self.meta["config"]
            cfg["hidden"] = tuple(cfg["hidden"])
            self.cfg = RankerConfig(**cfg)
        self.hashes_ids = bool(self.cfg.id_buckets) and self.cfg.variant not in SID_ROWS  # a bounded ID table
        self.codebook_version = self.meta["codebook_version"]
        self.users_version = self.meta.get("users_version")   # the user-feature snapshot it was trained with
        if not self.users_version:
            raise DamagedFileError(folder, f"{folder}: ranker.json names no user-feature snapshot (a ranker from "
                                   "before snapshots): run the refresh again to train one that pins its users")
        self.levels = int(self.meta["levels"])
        vocab = json.loads((folder / "vocab.json").read_text())
        self.id_row = {iid: i + 1 for i, iid in enumerate(vocab)}
        dim = int(self.meta["content_dim"])
        self.raw_dim = int(self.meta.get("raw_dim", 0)) if self.cfg.reads_raw else 0
        if self.cfg.reads_raw and not self.raw_dim:
            raise DamagedFileError(folder, f"{folder}: the ranker reads text-tower vectors but ranker.json records "
                                   "no raw_dim")
        tables = ItemTables(id_vocab=np.arange(len(vocab) + 1), content=np.zeros((1, dim), np.float32),
                            raw=np.zeros((1, self.raw_dim), np.float32) if self.raw_dim else None,
                            codes=np.zeros((1, self.levels), np.int64), n_codes=int(self.meta["n_codes"]),
                            dedup=np.zeros(1, np.int64),
                            code_vectors=np.zeros((self.levels, int(self.meta["n_codes"]),
                                                   int(self.meta.get("code_dim", dim))), np.float32))
        self.model = Ranker(self.cfg, tables, int(self.meta["n_user_feats"]))
        try:
            state = load_file(str(folder / "ranker.safetensors"))
        except Exception as e:  # truncated or tampered: refuse, naming the file
            raise DamagedFileError(folder / "ranker.safetensors", f"{folder / 'ranker.safetensors'}: not a readable "
                                   f"safetensors file ({str(e)[:200]}); refusing to load") from e
        try:
            missing_keys, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # right names, wrong shapes
            raise DamagedFileError(folder, f"{folder}: ranker weights do not match its config ({str(e)[:300]})") from e
        buffers = {n for n, _ in self.model.named_buffers()}
        if unexpected or set(missing_keys) - buffers:
            raise DamagedFileError(folder, f"{folder}: ranker weights do not match its config (missing "
                                   f"{missing_keys}, unexpected {unexpected})")
        self.model.eval()
        self.torch = torch
        if store is None:
            from semalign.config import Settings
            from semalign.feature_repo.store import open_store

            settings = settings or Settings()
            if self.meta.get("feast_project"):
                settings = settings.model_copy(update={"feast_project": self.meta["feast_project"]})
            store = open_store(settings, levels=self.levels)
        self.store = store

    # ------------------------------------------------------------------ features
    def user_rows(self, user_ids: list[str], records: list | None = None) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
        """(user features [n, 2], recent items per user, known mask) from the online store (or from `records`
        already read with `store.users_online`)."""
        from semalign.features import user_feature_vector

        rec = self.store.users_online(user_ids, self.users_version) if records is None else records
        prior = float(self.meta["label_prior"])
        n = np.array([r["n_events"] if r else 0 for r in rec], np.float64)
        rate = np.array([r["positive_rate"] if r else prior for r in rec], np.float64)
        feats = user_feature_vector(n, rate, prior)
        hists = [list(r["recent_items"])[-int(self.meta["hist_len"]):] if r else [] for r in rec]
        return feats, hists, np.array([r is not None for r in rec])

    def score(self, user_ids: list[str], item_ids: list[str], strict_users: bool = False) -> np.ndarray:
        """Probability of a positive for each (user_ids[j], item_ids[j]); user features and histories come
        from the online store (unknown users: no history, prior rate)."""
        if len(user_ids) != len(item_ids):
            raise ScoringError("user_ids and item_ids must have the same length")
        if not item_ids:
            return np.zeros(0, np.float32)
        user_ids, item_ids = [str(u) for u in user_ids], [str(i) for i in item_ids]
        uniq_users = list(dict.fromkeys(user_ids))
        ufeat, hists, known = self.user_rows(uniq_users)
        if strict_users and not known.all():
            raise ScoringError(f"unknown users: {[u for u, k in zip(uniq_users, known) if not k][:10]}")
        uidx = {u: k for k, u in enumerate(uniq_users)}
        sel = np.array([uidx[u] for u in user_ids])
        return self.score_rows(ufeat[sel], item_ids, [hists[k] for k in sel])

    def score_rows(self, user_feats: np.ndarray, item_ids: list[str], histories: list[list[str]],
                   batch: int = 8192, extra: dict | None = None) -> np.ndarray:
        """Scores rows given explicit user features and histories (item ids, most recent last); item features
        come from the online store pinned to this ranker's codebook version, or from `extra`
        ({item_id: (codes [levels], or [levels + 1] with the dedup level, aligned vector or None, text-tower
        vector or None)}) for items encoded on the fly. A ranker
        that reads text-tower vectors treats an item the version holds without one as missing."""
        torch = self.torch
        hl = int(self.meta["hist_len"])
        items = list(dict.fromkeys(list(item_ids) + [i for h in histories for i in h[-hl:]]))
        tables, pos = self._request_tables(items, set(item_ids), extra or {})
        hist_rows = np.zeros((len(item_ids), hl), np.int64)
        for r, h in enumerate(histories):  # history items the version lacks are dropped
            rows = [pos[i] for i in h if i in pos][-hl:]
            if rows:
                hist_rows[r, hl - len(rows):] = rows
        cand = torch.as_tensor([pos[i] for i in item_ids])
        u, h = torch.as_tensor(np.asarray(user_feats, np.float32)), torch.as_tensor(hist_rows)
        out = []
        # the request's item rows go in as the forward's tables: the parameters are shared and read-only, so
        # concurrent requests need no lock
        with torch.no_grad():
            for s in range(0, len(cand), batch):
                out.append(torch.sigmoid(self.model(u[s:s + batch], cand[s:s + batch], h[s:s + batch],
                                                    tables=tables).float()))
        return torch.cat(out).numpy()

    def _request_tables(self, items: list[str], cands: set, extra: dict) -> tuple[dict, dict]:
        """The model's item tables for one request's items (row 0 = padding, k+1 = items[k]) and {item_id: row}
        of the items found. Candidates the version lacks (or holds without the text-tower vector this ranker
        reads) are refused by name."""
        look = self.item_features([i for i in items if i not in extra])
        codes = np.zeros((len(items), self.levels + 1), np.int64)
        found = np.zeros(len(items), bool)
        emb, raw = [None] * len(items), [None] * len(items)
        for k, i in enumerate(items):
            if i in extra:
                given = np.asarray(extra[i][0])[: self.levels + 1]  # the dedup level where the caller has one
                codes[k, : len(given)] = given
                found[k] = True
                emb[k] = None if extra[i][1] is None else np.asarray(extra[i][1], np.float32)
                raw[k] = None if extra[i][2] is None else np.asarray(extra[i][2], np.float32)
            else:
                codes[k], found[k], emb[k], raw[k] = look[i]
        lacks_raw = np.array([bool(self.raw_dim) and f and (r is None or len(r) != self.raw_dim)
                              for f, r in zip(found, raw)], bool)
        found &= ~lacks_raw
        lacking = [i for i, lack in zip(items, lacks_raw) if lack and i in cands]
        if lacking:
            from semalign.feature_repo.errors import FeatureStoreError

            raise FeatureStoreError(
                f"codebook version {self.codebook_version} holds no {self.raw_dim}-d text-tower vector for "
                f"{lacking[:10]}; this ranker reads one: publish the version through `semalign run`/`refresh` "
                "or `semalign ids publish --data` (or onboard the items with their text)")
        cand_missing = [i for i, f in zip(items, found) if not f and i in cands]
        if cand_missing:
            from semalign.feature_repo.errors import ItemsNotFoundError

            raise ItemsNotFoundError(self.codebook_version, cand_missing)
        n = len(items) + 1
        content = np.zeros((n, int(self.meta["content_dim"])), np.float32)
        raw_tab = np.zeros((n, self.raw_dim), np.float32)
        code_tab = np.zeros((n, self.levels), np.int64)
        dedup = np.zeros(n, np.int64)
        id_vocab = np.zeros(n, np.int64)
        rows = np.flatnonzero(found)
        if self.hashes_ids:  # every item's ID hashes into the bounded table, as item_tables hashes it in training
            from semalign.models.compact import hash_item_rows

            id_vocab[rows + 1] = hash_item_rows([items[k] for k in rows], self.cfg.id_buckets, self.cfg.seed)
        else:
            id_vocab[rows + 1] = [self.id_row.get(items[k], 0) for k in rows]
        for k in rows:
            if self.cfg.reads_aligned:
                content[k + 1] = emb[k]
            if self.raw_dim:
                raw_tab[k + 1] = raw[k]
            code_tab[k + 1] = codes[k, : self.levels]
            dedup[k + 1] = max(int(codes[k, self.levels]), 0)
        t = self.torch
        tables = {"id_vocab": t.as_tensor(id_vocab), "content": t.as_tensor(content), "raw": t.as_tensor(raw_tab),
                  "codes": t.as_tensor(code_tab), "dedup": t.as_tensor(dedup)}
        return tables, {items[k]: k + 1 for k in np.flatnonzero(found)}

    def item_features(self, items: list[str]) -> dict:
        """{item_id: (codes [levels + 1] or -1s, found, aligned vector or None, text-tower vector or None)} from
        the online store (the text-tower vector only where this ranker reads it)."""
        if not items:
            return {}
        # a ranker whose items are their codes (compact profile) reads no vector: none is fetched
        codes, found, emb, raw = self.store.read_online(items, self.codebook_version, self.levels,
                                                        with_embedding=self.cfg.reads_aligned,
                                                        with_content=bool(self.raw_dim))
        emb = emb or [None] * len(items)
        raw = raw or [None] * len(items)
        return {i: (c, f, e, r) for i, c, f, e, r in zip(items, codes, found, emb, raw)}

    def score_frame(self, df: pd.DataFrame) -> np.ndarray:
        missing = [c for c in ("user_id", "item_id") if c not in df.columns]
        if missing:
            raise ScoringError(f"the frame needs columns user_id and item_id (missing {missing})")
        return self.score(df["user_id"].astype(str).tolist(), df["item_id"].astype(str).tolist())
