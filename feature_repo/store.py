"""The feature-store plugin: item semantic IDs and aligned vectors as versioned Feast features.

`SemanticIdStore(settings, embedder=...)` renders the Feast repo under SEMALIGN_HOME for the configured backends
(repo_config.py), applies it, and offers:
  publish(codebook, item_ids, embeddings)   a codebook version -> offline store + online store
  semantic_ids(item_ids, version=None)      online read, pinned to a version (default: the current one)
  historical(frame, version=None)           point-in-time join for training frames
  onboard(items) / encode(items)            content -> item embedder -> SID (pinned codebook) [-> both stores]
Versions are keyed by the `codebook_version` join key, so several coexist and publishing v2 changes nothing a
reader pinned to v1 sees. A version becomes readable only when its publish has finished (catalogue.py).
Content becomes vectors through the item embedder the caller hands in (embedder.py; `open_store` hands it in):
the store itself runs no model."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from semalign import atomic, state
from semalign.artifacts import codebook_folder, write_lineage
from semalign.checkpoints import checkpoint
from semalign.config import Settings
from semalign.errors import InvalidInputError
from semalign.feature_repo import online
from semalign.feature_repo.catalogue import CodebookCatalogue, sid_keys
from semalign.feature_repo.direct import check_vectors_served, sid_columns
from semalign.feature_repo.errors import FeatureStoreError, reaching
from semalign.feature_repo.offline import offline_writer
from semalign.feature_repo.repo_config import (EMB_VIEW, REVERSE_VIEW, SID_VIEW, USER_VIEW, ensure_applied, redis_connection_string,
                                               render_repo)
from semalign.feature_repo.rows import content_vectors, item_frames, onboarding_items, publish_inputs, timestamps
from semalign.hashing import digest

__all__ = ["SemanticIdStore", "open_store", "PublishResult", "SID_VIEW", "EMB_VIEW", "USER_VIEW", "redis_connection_string"]
# Feast converts every timestamp through datetime and says so once per row batch
warnings.filterwarnings("ignore", message="Discarding nonzero nanoseconds", category=UserWarning)

# (catalogue row of a published version) -> an object whose embed(items) returns (aligned [n, d], text [n, dt])
EmbedderFactory = Callable[[dict], object]


@dataclass
class PublishResult:
    version: str
    items: int
    published: bool        # False: this exact version was already published (nothing written)
    current: str | None
    wall_s: float


class SemanticIdStore:
    def __init__(self, settings: Settings, levels: int | None = None, embedder: EmbedderFactory | None = None):
        self.settings = settings
        self.project = settings.feast_project
        settings.home.mkdir(parents=True, exist_ok=True)
        self.state = state.engine(settings.resolved_state_url())
        self.catalogue = CodebookCatalogue(self.state, self.project)
        self.levels = levels or settings.codebook_levels
        self.repo = render_repo(settings, self.levels)
        self.offline = offline_writer(settings, self.repo, self.levels)
        self._embedder_for = embedder
        self._fs = None
        self._views, self._embedders, self._codebooks = {}, {}, {}

    # ------------------------------------------------------------------ feast plumbing
    @property
    def fs(self):
        if self._fs is None:
            import feast

            try:
                with reaching("the feature store registry"):
                    self._fs = feast.FeatureStore(repo_path=str(self.repo))
                    ensure_applied(self._fs, self.repo, self.project, self.levels, self.offline.prepare)
            except Exception:
                self._fs = None  # the next call tries again
                raise
        return self._fs

    def view(self, name: str):
        if name not in self._views:
            self._views[name] = self.fs.get_feature_view(name)
        return self._views[name]

    def _served(self, frames: dict) -> dict:
        """The item rows the online store holds under the serving profile: all of them (dense), or the SID rows and
        the reverse index without float vectors (compact). The offline store keeps every view either way."""
        if self.settings.serving_profile == "compact":
            return {k: v for k, v in frames.items() if k != EMB_VIEW}
        return frames

    def _online(self, what: str = ""):
        return reaching(f"the {self.settings.feast_online} online store{what}")

    # ------------------------------------------------------------------ catalogue
    def versions(self) -> list[dict]:
        return self.catalogue.versions()

    def current_version(self) -> str | None:
        return self.catalogue.current()

    def set_current(self, version: str, reason: str = "", actor: str | None = None) -> str | None:
        return self.catalogue.set_current(version, reason=reason, actor=actor)

    def _published(self, version: str | None) -> dict:
        return self.catalogue.published(version)

    # ------------------------------------------------------------------ publish
    def publish(self, codebook, item_ids, embeddings, encoder_version: str | None = None,
                available_at=None, make_current: bool = True, content=None) -> PublishResult:
        """Assigns every item its SID under `codebook` and publishes version `codebook.version` offline and
        online, with `content` (the frozen text-tower vectors, [n, dt]) beside the aligned vectors where given.
        Idempotent: the same version with the same content is a no-op; different content under an already
        published version is refused (versions are immutable)."""
        from semalign.models.sids import dedup_level

        t0 = time.perf_counter()
        item_ids = [str(i) for i in item_ids]
        emb = publish_inputs(codebook, item_ids, embeddings, self.levels)
        raw = content_vectors(content, len(item_ids), "nothing was published")
        codes = codebook.assign(emb)  # validates finiteness too
        tie = np.argsort(np.argsort(np.array(item_ids, dtype=object), kind="stable"), kind="stable")
        dedup = dedup_level(codes, tie_order=tie)
        # the text-tower vectors follow from the items' texts like `emb` does: not part of the version's identity,
        # so re-publishing a version with or without them is a no-op
        fingerprint = digest(codebook.version.encode(), "\0".join(item_ids).encode(), codes.astype(np.int64),
                             np.asarray(dedup, np.int64), emb, length=16)
        version = codebook.version
        folder = codebook_folder(self.settings, version)
        if not folder.exists():  # onboarding in any process needs the pinned codebook
            with atomic.building(folder.path) as tmp:
                codebook.save(tmp)
                if encoder_version:
                    write_lineage(tmp, encoder_version)
        row = self.catalogue.row(version)
        if row is not None and row["status"] == "published":
            if row["content_hash"] != fingerprint:
                raise FeatureStoreError(f"codebook version {version} is already published with different content "
                                        f"({row['n_items']} items, hash {row['content_hash']}); versions are "
                                        "immutable: build a new codebook version instead")
            if make_current and self.current_version() != version:
                self.set_current(version, reason="re-publish")
            return PublishResult(version, len(item_ids), False, self.current_version(), time.perf_counter() - t0)

        self.catalogue.begin_publish(version, dict(
            parent=codebook.parent, encoder_version=encoder_version, data_hash=codebook.data_hash,
            levels=codebook.levels, dim=codebook.dim, n_items=len(item_ids), content_hash=fingerprint),
            item_ids, sid_keys(codes), dedup)                      # 1. the version exists, not readable yet
        now = pd.Timestamp.now(tz="UTC").floor("us")
        frames = item_frames(version, item_ids, codes, dedup, emb, raw, timestamps(available_at, len(item_ids)), now)
        self.offline.write(frames, batch=f"{version}")           # 2. offline (atomic per store)
        checkpoint("publish.after_offline")
        with self._online():                                     # 3. online
            online.write_rows(self.fs, self._served(frames), between=lambda: checkpoint("publish.online"))
        self.catalogue.finish_publish(version)                   # 4. readable from here on
        if codebook.parent and self.catalogue.row(codebook.parent) is not None:
            self.write_diff(codebook.parent, version)
        if make_current:
            self.set_current(version, reason="publish")
        return PublishResult(version, len(item_ids), True, self.current_version(), time.perf_counter() - t0)

    # ------------------------------------------------------------------ reads
    def semantic_ids(self, item_ids, version: str | None = None, with_embedding: bool = False,
                     strict: bool = True) -> pd.DataFrame:
        """Online read for one codebook version (default: the current one). One row per item, in order:
        item_id, codebook_version, sid_0..sid_{L-1}, sid_dedup (and embedding). Items the store does not hold
        raise ItemsNotFoundError, or with strict=False come back with `found` False and SIDs of -1."""
        row = self._published(version)
        version, levels = row["version"], row["levels"]
        item_ids = [str(i) for i in item_ids]
        codes, found, emb, _ = self.read_online(item_ids, version, levels, with_embedding)
        return pd.DataFrame(sid_columns(item_ids, version, levels, codes, found, emb, with_embedding, strict))

    def read_online(self, item_ids: list[str], version: str, levels: int, with_embedding: bool = False,
                    with_content: bool = False):
        """The hot path under `semantic_ids` and serving (online.py). The caller has checked that `version` is
        published. Returns (codes [n, levels+1] with -1 where missing, found, emb, content): emb and content are
        lists of vectors (None where missing; content is empty where the version was published without it), or
        None when not asked for."""
        check_vectors_served(self.settings, with_embedding or with_content)
        fs = self.fs
        with self._online():
            return online.read_items(fs, self.view(SID_VIEW), self.view(EMB_VIEW), item_ids, version, levels,
                                     with_embedding, with_content)

    def historical(self, frame: pd.DataFrame, version: str | None = None, with_embedding: bool = False) -> pd.DataFrame:
        """Point-in-time join: `frame` has item_id and event_timestamp (and optionally codebook_version); each row
        gets the SID its item had under the pinned version at that time (null before the item was published
        or onboarded into that version)."""
        if "item_id" not in frame or "event_timestamp" not in frame:
            raise InvalidInputError("the frame needs columns item_id and event_timestamp")
        ent = frame.copy()
        if "codebook_version" not in ent:
            ent["codebook_version"] = self._published(version)["version"]
        for v in ent["codebook_version"].unique():
            self._published(v)
        ent["item_id"] = ent["item_id"].astype(str)
        ent["event_timestamp"] = pd.to_datetime(ent["event_timestamp"], utc=True)
        row = self._published(ent["codebook_version"].iloc[0]) if len(ent) else {"levels": self.levels}
        feats = [f"{SID_VIEW}:sid_{lvl}" for lvl in range(row["levels"])] + [f"{SID_VIEW}:sid_dedup"]
        if with_embedding:
            feats.append(f"{EMB_VIEW}:embedding")
        ent["_row"] = np.arange(len(ent))
        feat_cols = [f.split(":")[1] for f in feats]
        # rows whose item a version never held are null without asking Feast (its file store fails on a join
        # where nothing matches); the rest go through the point-in-time join
        held = self.catalogue.held(ent["codebook_version"].unique())
        mask = np.array([(v, i) in held for v, i in zip(ent["codebook_version"], ent["item_id"])], bool)
        with reaching(f"the {self.settings.feast_offline} offline store"):
            got = self.fs.get_historical_features(entity_df=ent[mask], features=feats).to_df() if mask.any() \
                else pd.DataFrame(columns=["_row"] + feat_cols)
        # one output row per input row, in input order (the file store also drops rows that match nothing)
        return ent.merge(got[["_row"] + feat_cols], on="_row", how="left").drop(columns="_row")

    # ------------------------------------------------------------------ SIDs as keys
    def items_by_sid(self, sid: str, version: str | None = None, limit: int | None = 1000) -> pd.DataFrame:
        """Reverse lookup: the items (published or onboarded) whose SID under a version starts with `sid`, a
        prefix "c0", "c0-c1", ... up to the full SID with its dedup level. Columns item_id, codebook_version, sid,
        source (batch | onboard)."""
        row = self._published(version)
        version, levels = row["version"], row["levels"]
        parts = str(sid).strip().split("-")
        if not 1 <= len(parts) <= levels + 1 or not all(p.isdigit() for p in parts):
            raise InvalidInputError(f"'{sid}' is not a SID prefix of codebook {version}: expected 1 to "
                                    f"{levels + 1} non-negative codes joined by '-', e.g. '12' or '12-5'")
        codes = [str(int(p)) for p in parts]
        if len(codes) > levels:  # a full SID names one item: the online store's reverse view answers
            return self.items_by_full_sid(["-".join(codes)], version)
        rows = self.catalogue.slots(version, "-".join(codes[:levels]), limit)
        return pd.DataFrame({"item_id": [r["item_id"] for r in rows], "codebook_version": version,
                             "sid": [f"{r['sid_key']}-{r['dedup']}" for r in rows],
                             "source": [r["source"] for r in rows]},
                            columns=["item_id", "codebook_version", "sid", "source"])

    def items_by_full_sid(self, semantic_ids: list[str], version: str | None = None) -> pd.DataFrame:
        """The items full SIDs ('c0-...-dedup') name under a version, read from the reverse feature view
        (`semantic_id_item`, the same one a plain Feast client reads); SIDs that name no item are left out."""
        version = self._published(version)["version"]
        with self._online():
            found = online.read_reverse(self.fs, self.view(REVERSE_VIEW), list(semantic_ids), version)
        hits = [(s, i) for s, i in zip(semantic_ids, found) if i is not None]
        # each hit's source from the catalogue rows under its own SID prefix, not the version's whole onboarding list
        source = {r["item_id"]: r["source"] for prefix in {s.rsplit("-", 1)[0] for s, _ in hits}
                  for r in self.catalogue.slots(version, prefix)}
        return pd.DataFrame({"item_id": [i for _, i in hits], "codebook_version": version,
                             "sid": [s for s, _ in hits],
                             "source": ["onboard" if source.get(i) == "onboard" else "batch" for _, i in hits]},
                            columns=["item_id", "codebook_version", "sid", "source"])

    def vector_index(self, version: str | None = None, chunk: int = 20000) -> dict:
        """Every item a version holds (published and onboarded) with its full SID and aligned vector, read from
        the online store: what `similar` searches. Exact search, one scan per query: neither embedded backend has
        a vector index here (see README "Feature store")."""
        row = self._published(version)
        version, levels = row["version"], row["levels"]
        ids, codes = self.catalogue.sid_table(version, levels)
        vecs = np.zeros((len(ids), row["dim"]), np.float32)
        for s in range(0, len(ids), chunk):
            _, found, emb, _ = self.read_online(ids[s:s + chunk], version, levels, with_embedding=True)
            if not found.all():
                missing = [i for i, f in zip(ids[s:s + chunk], found) if not f][:5]
                raise FeatureStoreError(f"codebook version {version}: the online store lacks {missing}, which the "
                                        "SID catalogue holds; run `feast materialize-incremental` on the repo")
            vecs[s:s + len(emb)] = np.stack(emb)
        return {"version": version, "levels": levels, "item_ids": ids, "codes": codes, "vectors": vecs}

    def similar(self, index: dict, queries: np.ndarray, k: int = 10, exclude: list[str | None] | None = None) -> list[pd.DataFrame]:
        """The k items of `index` (from `vector_index`) nearest each query vector by cosine, best first, without
        the item named in `exclude[j]` (the query item itself): item_id, score, sid, shares_first_level (with the
        query's first-level code under the version's codebook)."""
        from semalign.models.sids import nearest

        queries = np.asarray(queries, np.float32).reshape(-1, index["vectors"].shape[1])
        pos = {i: r for r, i in enumerate(index["item_ids"])}
        drop = [[pos[e]] if e is not None and e in pos else [] for e in (exclude or [None] * len(queries))]
        rows, scores = nearest(index["vectors"], queries, k, drop)
        first = self._codebook(index["version"]).assign(queries)[:, 0]
        out = []
        for j in range(len(queries)):
            c = index["codes"][rows[j]]
            out.append(pd.DataFrame({"item_id": [index["item_ids"][r] for r in rows[j]], "score": scores[j],
                                     "sid": ["-".join(map(str, x)) for x in c.tolist()],
                                     "shares_first_level": c[:, 0] == first[j]}))
        return out

    def diff(self, old: str, new: str) -> tuple[dict, pd.DataFrame]:
        """SID translation between two published versions: (summary with churn per level, table item_id,
        old_sid, new_sid for the items both hold, onboarded ones included)."""
        from semalign.models.sids import sid_translation

        sides = [self.catalogue.sid_table(v, self._published(v)["levels"]) for v in (old, new)]
        t = sid_translation(sides[0][0], sides[0][1], sides[1][0], sides[1][1])
        summary = {"old": old, "new": new, "shared_items": len(t["shared"]), "only_in_old": len(t["only_old"]),
                   "only_in_new": len(t["only_new"]), "churn": t["churn"], "prefix_churn_per_level": t["per_level"]}
        table = pd.DataFrame({"item_id": t["shared"], "old_sid": ["-".join(map(str, r)) for r in t["old"].tolist()],
                              "new_sid": ["-".join(map(str, r)) for r in t["new"].tolist()]})
        return summary, table

    def write_diff(self, old: str, new: str) -> Path:
        """The translation from `old` to `new` as files in `new`'s codebook folder (logged with a refresh's run):
        diff-<old>.json (summary) and diff-<old>.parquet (item_id, old_sid, new_sid)."""
        import json

        summary, table = self.diff(old, new)
        folder = codebook_folder(self.settings, new).path
        tmp = atomic.temp_sibling(folder / f"diff-{old}.parquet")
        table.to_parquet(tmp, index=False)
        os.replace(tmp, folder / f"diff-{old}.parquet")
        atomic.write_text(folder / f"diff-{old}.json", json.dumps(summary, indent=2))
        return folder / f"diff-{old}.json"

    # ------------------------------------------------------------------ onboarding
    def onboard(self, items: pd.DataFrame, version: str | None = None, embeddings: np.ndarray | None = None,
                content: np.ndarray | None = None) -> pd.DataFrame:
        """New items -> aligned vectors (the item embedder of the pinned codebook, or `embeddings` given, with
        their text-tower vectors as `content`) -> SIDs with the pinned codebook -> online and offline in one
        call. Items the version already holds keep their SIDs; nothing is written when a step fails."""
        row = self._published(version)
        version = row["version"]
        items = onboarding_items(items)
        raw = None
        if embeddings is None:
            emb, raw = self._embedder(row).embed(items)
        else:
            emb = np.asarray(embeddings, dtype=np.float32)
            if emb.ndim != 2 or emb.shape != (len(items), row["dim"]):
                raise InvalidInputError(f"embeddings for codebook {version} must have shape ({len(items)}, "
                                        f"{row['dim']}); got {tuple(emb.shape)}; nothing was onboarded")
            raw = content_vectors(content, len(items), "nothing was onboarded")
        ids = items["item_id"].tolist()
        # reserve the slots (committed), write both stores, confirm: a writer that dies in between leaves a
        # pending slot that nobody else gets and that the next onboarding of the item writes again
        codes, dedup, write, fresh = self.catalogue.reserve(version, ids, self._codebook(version).assign(emb))
        if write.any():
            now = time.time()
            ts = pd.Timestamp(now, unit="s", tz="UTC").floor("us")
            sel = np.flatnonzero(write)
            frames = item_frames(version, [ids[j] for j in sel], codes[sel], dedup[sel], emb[sel],
                                 None if raw is None else raw[sel], ts, ts)
            with self._online():
                online.push_rows(self.fs, self._served(frames))
            self.offline.write(frames, batch=f"{version}-onboard-{int(now * 1e6)}-{os.getpid()}")
            checkpoint("onboard.before_confirm")
            self.catalogue.confirm(version, [ids[j] for j in sel])
        out = pd.DataFrame({"item_id": ids, "codebook_version": version})
        for lvl in range(codes.shape[1]):
            out[f"sid_{lvl}"] = codes[:, lvl]
        out["sid_dedup"] = dedup
        out["onboarded"] = fresh | write   # this call wrote the item (a pending slot left by a dead writer counts)
        return out

    def encode(self, items: pd.DataFrame, version: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SIDs [n, levels] (no dedup level), aligned vectors and text-tower vectors for items' content under a
        published version, without writing anything: what serving does for candidates it is not asked to onboard."""
        row = self._published(version)
        emb, raw = self._embedder(row).embed(items)
        return self._codebook(row["version"]).assign(emb), emb, raw

    def _codebook(self, version: str):
        if version not in self._codebooks:
            self._codebooks[version] = codebook_folder(self.settings, version).load_codebook()
        return self._codebooks[version]

    def _embedder(self, row: dict):
        if self._embedder_for is None:
            raise FeatureStoreError("this store was opened without an item embedder, so it cannot turn content into "
                                    "vectors: open it with semalign.feature_repo.store.open_store, or pass embeddings")
        if row["version"] not in self._embedders:
            self._embedders[row["version"]] = self._embedder_for(row)
        return self._embedders[row["version"]]

    # ------------------------------------------------------------------ users and ranker services
    def publish_users(self, frame: pd.DataFrame, batch: str) -> str:
        """Publishes one snapshot of user features, `users-<batch>`, beside the earlier ones: nothing a ranker
        pinned to another snapshot reads changes. frame: user_id, recent_items (item ids, newest last), n_events,
        positive_rate, event_timestamp. Returns the snapshot's version."""
        version = f"users-{batch}"
        df = frame.copy()
        df["user_id"] = df["user_id"].astype(str)
        df["users_version"] = version
        df["created"] = pd.Timestamp.now(tz="UTC")
        self.offline.write({USER_VIEW: df}, batch=version)
        with self._online():
            online.write_rows(self.fs, {USER_VIEW: df})
        return version

    def users_online(self, user_ids: list[str], version: str) -> list[dict | None]:
        """Each user's recent items and activity in snapshot `version` (None for users it does not hold)."""
        fs = self.fs
        with self._online():
            return online.read_users(fs, self.view(USER_VIEW), user_ids, version)

    def register_ranker_service(self, name: str, codebook_version: str, tags: dict | None = None) -> str:
        """One feature service per ranker version, tagged with the codebook version its readers must pin."""
        from feast import FeatureService

        self._published(codebook_version)
        svc = FeatureService(name=name, features=[self.view(SID_VIEW), self.view(EMB_VIEW), self.view(USER_VIEW)],
                             tags={"codebook_version": codebook_version, **(tags or {})},
                             description=f"Features of ranker {name}; pin codebook_version={codebook_version}.")
        self.fs.apply([svc])
        return name

    def service_version(self, name: str) -> str:
        return self.fs.get_feature_service(name).tags["codebook_version"]


def open_store(settings: Settings, levels: int | None = None) -> SemanticIdStore:
    """The feature store with the item embedder handed in, so it can onboard and encode items from content: what
    the flows, the CLI and serving open (the models load on the first item embedded, not here)."""
    from semalign.feature_repo.embedder import item_embedders

    return SemanticIdStore(settings, levels=levels, embedder=item_embedders(settings))
