"""Ranker inputs, computed in one place for training, evaluation and serving (no train/serve skew).

User features: from a user's training-window events, the smoothed positive rate (minus the global prior) and
the log event count. Training and evaluation compute them from the split (`user_features`); the refresh
publishes the same statistics to the feature store (`user_table`); the scorer turns the published statistics
back into the same vector (`user_feature_vector`). History: the user's training-window positives strictly
before the event (`semalign.data.user_histories`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from semalign.data import Dataset, Split, user_histories

N_USER_FEATS = 2
RATE_SMOOTHING = 5.0   # pseudo-events at the global prior


def user_feature_vector(n_events: np.ndarray, positive_rate: np.ndarray, prior: float) -> np.ndarray:
    """[n, 2] float32: (smoothed positive rate - prior, log1p(events) / 5). Users with no events: (0, 0)."""
    n = np.asarray(n_events, np.float64)
    rate = np.asarray(positive_rate, np.float64)
    return np.stack([rate - prior, np.log1p(n) / 5.0], 1).astype(np.float32)


def user_stats(train: pd.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per user index: (training-window event count, smoothed positive rate) and the global prior."""
    n = np.bincount(train["user_idx"], minlength=n_users).astype(np.float64)
    pos = np.bincount(train["user_idx"], weights=train["label"], minlength=n_users)
    prior = float(train["label"].mean()) if len(train) else 0.0
    rate = (pos + RATE_SMOOTHING * prior) / (n + RATE_SMOOTHING)
    return n, rate, prior


def user_features(split: Split, n_users: int) -> np.ndarray:
    n, rate, prior = user_stats(split.part("train"), n_users)
    return user_feature_vector(n, rate, prior)


def user_table(ds: Dataset, split: Split, hist_len: int) -> pd.DataFrame:
    """The rows the feature store serves per user who has training-window events: user_id, recent_items (item
    ids, newest last), n_events, positive_rate, event_timestamp."""
    tr = split.part("train")
    n, rate, _ = user_stats(tr, ds.n_users)
    users_idx = np.flatnonzero(n > 0)
    positives = tr[tr["label"] == 1].sort_values(["user_idx", "ts", "item_idx"], kind="stable")
    recent = positives.groupby("user_idx")["item_id"].apply(lambda s: s.tolist()[-hist_len:])
    user_ids = ds.interactions.drop_duplicates("user_idx").set_index("user_idx")["user_id"]
    out = pd.DataFrame({"user_id": user_ids.reindex(users_idx).astype(str).to_numpy()})
    out["recent_items"] = [recent.get(u, []) for u in users_idx]
    out["n_events"] = n[users_idx].astype(np.int64)
    out["positive_rate"] = rate[users_idx].astype(np.float32)
    out["event_timestamp"] = (pd.Timestamp(int(tr["ts"].max()), unit="s", tz="UTC") if len(tr)
                              else pd.Timestamp.now(tz="UTC"))
    return out


def build_frames(split: Split, ufeat: np.ndarray, hist_len: int):
    """Model inputs (`Frame`) of the train, val and test events."""
    from semalign.models.ranker import Frame

    train = split.part("train")
    frames = {}
    for name in ("train", "val", "test"):
        ev = split.part(name)
        hist, _ = user_histories(ev, train, hist_len)
        frames[name] = Frame(user_feats=ufeat[ev["user_idx"].to_numpy()], cand=ev["item_idx"].to_numpy() + 1,
                             hist=hist, label=ev["label"].to_numpy().astype(np.float32))
    return frames


def item_tables(ds: Dataset, split: Split, aligned: np.ndarray, raw: np.ndarray | None, codes: np.ndarray,
                n_codes: int, dedup: np.ndarray | None = None, cfg=None, code_vectors=None):
    """Per-item model inputs for a ranker configuration `cfg` (None: one ID row per training item, float vectors).
    One ID row per item: only items with training-window events get one (the rest share row 0). With
    `cfg.id_buckets`, every item's ID hashes into that many rows (seeded by `cfg.seed`; serving hashes the same
    way). With `cfg.content_codec`, the aligned vector is what the codec serves (fit on training items)."""
    from semalign.models.compact import VectorCodec, hash_item_rows
    from semalign.models.ranker import SID_ROWS, ItemTables

    buckets = getattr(cfg, "id_buckets", 0)
    seen = split.train_items
    if buckets and getattr(cfg, "variant", None) not in SID_ROWS:
        vocab = np.concatenate([[0], hash_item_rows(ds.items["item_id"].tolist(), buckets, cfg.seed)])
    else:
        vocab = np.zeros(ds.n_items + 1, dtype=np.int64)
        vocab[seen + 1] = np.arange(1, len(seen) + 1)
    codec = getattr(cfg, "content_codec", "float")
    if codec != "float" and aligned is not None:
        aligned = VectorCodec(codec, seed=cfg.seed).fit(aligned[seen]).roundtrip(aligned)

    def pad(x):
        return None if x is None else np.concatenate([np.zeros((1, x.shape[1]), x.dtype), x])

    if code_vectors is not None:  # the codebook's centroids per level, [L, K, dz]
        code_vectors = np.stack([np.asarray(c, np.float32) for c in code_vectors])
    return ItemTables(id_vocab=vocab, content=pad(aligned), raw=pad(raw), codes=pad(codes), n_codes=n_codes,
                      dedup=None if dedup is None else np.concatenate([[0], np.asarray(dedup, np.int64)]),
                      code_vectors=code_vectors)
