"""The ranker's stages in the refresh: user features to the store, training (keyed by its inputs, so a re-run
reuses what exists), and evaluation through the serving path."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semalign import atomic
from semalign.config import Settings
from semalign.progress import Reporter


@dataclass
class RankerOut:
    input_key: str
    folder: Path
    registered: str | None       # a version already registered for these inputs
    fit: dict


def ranker_input_key(settings: Settings, ds, cb_version: str) -> str:
    from dataclasses import asdict

    from semalign.hashing import digest
    from semalign.spec import ranker_config

    return "rk-" + digest(ds.content_hash(), cb_version, settings.split, settings.seed, settings.cold_item_share,
                         settings.val_cold_item_share, settings.hist_len, asdict(ranker_config(settings)), length=12)


def train_ranker_stage(settings: Settings, ds, split, cb, enc, feats, registry, rep: Reporter,
                       users_version: str | None = None, engine=None) -> RankerOut:
    from semalign.data import event_keys
    from semalign.deploy.scoring import save_ranker
    from semalign.features import N_USER_FEATS, build_frames, user_features
    from semalign.flows.engines import compute_engine
    from semalign.flows.semantic_ids import load_codebook

    key = ranker_input_key(settings, ds, cb.version)
    folder = settings.home / "rankers" / key
    mv = registry.version_by_input(key)
    if mv is not None:
        return RankerOut(key, folder, str(mv.version), {"reused": True})
    meta_file = folder / "ranker.json"   # a run that stopped after training (the folder lands whole, by rename)
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("input_key") == key:
            return RankerOut(key, folder, None, {"reused": True, "best_epoch": meta.get("best_epoch"),
                                                 "val_auc": meta.get("val_auc")})
    codebook = load_codebook(settings, cb.version)
    spec, tables = ranker_inputs(settings, ds, split, cb, codebook, feats)
    cfg = spec.ranker
    aligned_dim = len(cb.sids["embedding"].iloc[0])
    seen = split.train_items
    frames = build_frames(split, user_features(split, ds.n_users), settings.hist_len)
    res = (engine or compute_engine(settings)).train_ranker(cfg, tables, frames["train"], frames["val"], rep)
    train = split.part("train")
    meta = {"codebook_version": cb.version, "encoder_version": enc.version, "levels": codebook.levels,
            "n_codes": codebook.codes, "content_dim": aligned_dim, "n_user_feats": N_USER_FEATS,
            "code_dim": int(codebook.centroids[0].shape[1]),
            "raw_dim": int(feats.text.shape[1]) if cfg.keep_raw_content else 0,
            "label_prior": float(train["label"].mean()), "hist_len": settings.hist_len,
            "feast_project": settings.feast_project, "data_hash": ds.content_hash(), "input_key": key,
            "users_version": users_version, "serving_profile": settings.serving_profile,
            "bytes_per_item": served_bytes_per_item(cfg, codebook.levels, codebook.codes, aligned_dim,
                                                    int(feats.text.shape[1]), int(cb.sids["sid_dedup"].max())),
            "best_epoch": res.best_epoch, "val_auc": res.best_val_auc}
    with atomic.building(folder) as tmp:  # a stopped run's folder lands whole or not at all
        save_ranker(res.model, tmp, meta, ds.items["item_id"].iloc[seen].tolist())
        spec.write(tmp / SPEC_FILE)   # encoder, codebook and ranker of this model, as the experiment measures them
        np.save(tmp / TRAINED_EVENTS, np.unique(event_keys(split.events[split.events["part"] != "test"])))
    return RankerOut(key, folder, None, {"reused": False, "best_epoch": res.best_epoch, "val_auc": res.best_val_auc,
                                         "train_samples_per_s": res.samples_per_s})


SPEC_FILE = "spec.json"   # beside every trained ranker: its semalign.spec.Specification


def ranker_inputs(settings: Settings, ds, split, cb, codebook, feats):
    """(the served model's specification, its item tables): what the refresh trains, from the settings' (or the
    selected) specification and the codebook version the ranker reads."""
    from semalign.spec import specification

    spec = specification(settings).with_codebook(codebook)
    return spec, ranker_tables(ds, split, cb, codebook, feats, spec.ranker)


def ranker_tables(ds, split, cb, codebook, feats, cfg, generic=None):
    """The ranker's per-item tables, for the refresh and the experiment alike: a codebook version's SIDs (the
    code count is the codebook's own) and aligned vectors, and the raw vector the configuration reads (the
    text-tower vector the store serves; `generic` content for the `content` / `logreg` baselines)."""
    from semalign.features import item_tables

    sid_cols = [f"sid_{lvl}" for lvl in range(codebook.levels)]
    aligned = np.stack(cb.sids["embedding"].to_numpy()).astype(np.float32)
    raw = generic if cfg.variant in ("content", "logreg") else feats.text if cfg.reads_raw else None
    return item_tables(ds, split, aligned, raw, cb.sids[sid_cols].to_numpy(), codebook.codes,
                       cb.sids["sid_dedup"].to_numpy(), cfg, [c.numpy() for c in codebook.centroids])


def publish_users(settings: Settings, ds, split, store=None) -> str:
    """Each user's training-window positives (most recent last) and smoothed positive rate, for serving, as a new
    snapshot (a ranker reads the snapshot it was trained with: a blocked refresh changes nothing served).
    Returns the snapshot's version."""
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.features import user_table

    batch = ds.content_hash()[:16] + "-h" + str(settings.hist_len)
    return (store or SemanticIdStore(settings)).publish_users(user_table(ds, split, settings.hist_len), batch=batch)


def served_bytes_per_item(cfg, levels: int, n_codes: int, aligned_dim: int, raw_dim: int, max_dedup: int) -> int:
    """Bytes of item features the ranker reads per item at serving (codes at their packed width, vectors as
    float32 or their codec): the model's payload, not the online store's overhead (bench/ measures that)."""
    from semalign.models.compact import codec_bytes

    width = lambda top: max(1, (max(int(top), 1).bit_length() + 7) // 8)  # noqa: E731
    n = levels * width(n_codes - 1) + width(max_dedup) if cfg.reads_codes else 0
    if cfg.reads_aligned:
        n += codec_bytes(cfg.content_codec, aligned_dim)
    if cfg.reads_raw:
        n += 4 * raw_dim
    return n


TRAINED_EVENTS = "trained_events.npy"   # keys of the events a ranker trained and validated on (data.event_keys)


def score_test(settings: Settings, ds, split, ranker_folder: Path, encode_missing: bool = False,
               store=None) -> np.ndarray:
    """A ranker's scores for the test window's events, through the serving path: features from the store, pinned
    to the ranker's codebook version; histories are the leakage-free ones the ranker trained with. With
    `encode_missing` (the champion on a new window) items its version lacks are encoded on the fly, as serving
    does for content it is sent: nothing is written to the store the champion serves from."""
    from semalign.data import user_histories
    from semalign.deploy.scoring import RankerScorer
    from semalign.features import user_features

    if store is not None:  # a ranker of another project or SID depth reads through a store of its own
        meta_file = Path(ranker_folder) / "ranker.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if (meta.get("feast_project") or store.project, meta.get("levels")) != (store.project, store.levels):
            store = None
    scorer = RankerScorer(ranker_folder, settings, store=store)
    test = split.part("test")
    item_ids = ds.items["item_id"].to_numpy()
    cands = item_ids[test["item_idx"].to_numpy()].tolist()
    extra = {}
    if encode_missing:
        store = scorer.store
        _, found, _, _ = store.read_online(sorted(set(cands)), scorer.codebook_version, scorer.levels)
        missing = [i for i, f in zip(sorted(set(cands)), found) if not f]
        if missing:
            rows = ds.items.set_index("item_id").loc[missing].reset_index()
            codes, emb, raw = store.encode(rows[[c for c in ("item_id", "text", "image_path") if c in rows]],
                                           version=scorer.codebook_version)
            extra = {iid: (codes[k], emb[k], raw[k]) for k, iid in enumerate(missing)}
    hist, _ = user_histories(test, split.part("train"), settings.hist_len)
    histories = [[item_ids[r - 1] for r in row if r > 0] for row in hist]
    ufeat = user_features(split, ds.n_users)[test["user_idx"].to_numpy()]
    return scorer.score_rows(ufeat, cands, histories, extra=extra)


def bucket_metrics(y: np.ndarray, p: np.ndarray, users: np.ndarray, buckets: np.ndarray,
                   mask: np.ndarray | None = None, both_classes: bool = True) -> dict:
    """Metrics (models.metrics.metric_set) per item bucket of scored events (those in `mask`, when given): how the
    refresh judges a window and the experiment compares models. With `both_classes`, a bucket of one label is left
    out (its AUC is undefined)."""
    from semalign.data import ALL_BUCKETS
    from semalign.models.metrics import metric_set

    keep = np.ones(len(y), bool) if mask is None else mask
    out = {}
    for b in ALL_BUCKETS:
        sel = keep if b == "all" else keep & (buckets == b)
        if sel.sum() and (not both_classes or len(np.unique(y[sel])) == 2):
            out[b] = {**metric_set(y[sel], p[sel], users[sel]), "n_positive": int(y[sel].sum())}
    return out


def window_metrics(split, p: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """AUC / GAUC per item bucket of the test window's events (those in `mask`, when given)."""
    from semalign.data import item_buckets

    test = split.part("test")
    y = test["label"].to_numpy()
    buckets = item_buckets(split.train_counts)[test["item_idx"].to_numpy()]
    return {b: {"auc": float(m["auc"]), "gauc": float(m["gauc"]), "n_events": m["n_events"],
                "n_positive": m["n_positive"]}
            for b, m in bucket_metrics(y, p, test["user_idx"].to_numpy(), buckets, mask).items()}


def fresh_events(ranker_folder: Path, split, item_ids: np.ndarray) -> np.ndarray | None:
    """Which test events a fair comparison with this ranker (the champion) can use (None: it kept no event keys,
    from before they were kept): events it never trained or validated on, whose item is not one it trained on
    while the challenger holds it out as cold. A champion judged on events it learned from, or on "unseen" items
    it learned from other events of, looks better than it is: a resampled or overlapping window would then block
    every honest challenger."""
    from semalign.data import event_keys

    folder = Path(ranker_folder)
    if not (folder / TRAINED_EVENTS).exists():
        return None
    test = split.part("test")
    fresh = ~np.isin(event_keys(test), np.load(folder / TRAINED_EVENTS))
    known = set(json.loads((folder / "vocab.json").read_text()))     # the items the champion has ID rows for
    idx = test["item_idx"].to_numpy()
    only_champion_knows = np.fromiter((i in known for i in item_ids[idx]), bool, len(idx)) & (split.train_counts[idx] == 0)
    return fresh & ~only_champion_knows


def judge_window(settings: Settings, ds, split, challenger_folder: Path, champion_folder: Path | None,
                 store=None) -> dict:
    """The challenger on its whole test window (its reference for the next refresh's drift gate) and, with a
    champion, both on the same events: those the champion never trained or validated on."""
    p_new = score_test(settings, ds, split, challenger_folder, store=store)
    out = {"challenger": window_metrics(split, p_new), "champion": None}
    if champion_folder is None:
        return out
    p_old = score_test(settings, ds, split, champion_folder, encode_missing=True, store=store)
    mask = fresh_events(champion_folder, split, ds.items["item_id"].to_numpy())
    n_test = len(p_new)
    out["champion"] = window_metrics(split, p_old, mask)
    out["compared"] = {"challenger": window_metrics(split, p_new, mask) if mask is not None else out["challenger"],
                       "events": int(mask.sum()) if mask is not None else n_test, "test_events": n_test,
                       "excludes_champion_training": mask is not None,
                       "paired": compared_pairwise(settings, split, p_new, p_old, mask)}
    return out


def compared_pairwise(settings: Settings, split, p_new: np.ndarray, p_old: np.ndarray, mask: np.ndarray | None) -> dict:
    """Challenger minus champion on the events both are judged on, overall and on unseen items, with paired
    bootstrap intervals over users (validation.suites.paired_comparison): what the quality gate decides on."""
    from semalign.data import item_buckets
    from semalign.validation.suites import paired_comparison

    test = split.part("test")
    keep = np.ones(len(test), bool) if mask is None else mask
    unseen = item_buckets(split.train_counts)[test["item_idx"].to_numpy()] == "unseen"
    sel = {"all": keep, "unseen": keep & unseen}
    return paired_comparison(test["label"].to_numpy(), p_new, p_old, test["user_idx"].to_numpy(), sel,
                             seed=settings.seed)
