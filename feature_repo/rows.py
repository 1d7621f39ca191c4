"""The rows the store writes for a batch of items, and the checks on what callers hand it (every refusal says
what was expected and that nothing was written)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from semalign.errors import DataValidationError, InvalidInputError
from semalign.feature_repo.errors import FeatureStoreError
from semalign.feature_repo.repo_config import EMB_VIEW, REVERSE_VIEW, SID_VIEW

EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def item_frames(version, item_ids, codes, dedup, emb, raw, event_ts, created) -> dict[str, pd.DataFrame]:
    """The rows of the item views for one batch: SIDs, vectors, and the reverse (full SID -> item) rows."""
    base = pd.DataFrame({"item_id": item_ids, "codebook_version": version})
    sid = base.copy()
    for lvl in range(codes.shape[1]):
        sid[f"sid_{lvl}"] = codes[:, lvl].astype(np.int64)
    sid["sid_dedup"] = np.asarray(dedup, dtype=np.int64)
    e = base.copy()
    e["embedding"] = list(emb.astype(np.float32))
    e["content"] = [np.zeros(0, np.float32)] * len(e) if raw is None else list(raw)
    rev = pd.DataFrame({"semantic_id": full_sids(codes, dedup), "codebook_version": version, "item_id": item_ids})
    for df in (sid, e, rev):
        df["event_timestamp"] = event_ts
        df["created"] = created
    return {SID_VIEW: sid, EMB_VIEW: e, REVERSE_VIEW: rev}


def full_sids(codes: np.ndarray, dedup) -> list[str]:
    """'c0-c1-...-dedup' per row: the reverse view's key."""
    full = np.concatenate([np.asarray(codes, np.int64), np.asarray(dedup, np.int64).reshape(-1, 1)], axis=1)
    return ["-".join(map(str, r)) for r in full.tolist()]


def publish_inputs(codebook, item_ids: list[str], embeddings, levels: int) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != codebook.dim:
        raise InvalidInputError(f"embeddings for codebook {codebook.version} must have width {codebook.dim}; "
                                f"got shape {tuple(emb.shape)}; nothing was published")
    if len(item_ids) != len(emb):
        raise InvalidInputError(f"{len(item_ids)} item ids but {len(emb)} embeddings; nothing was published")
    dup = pd.Index(item_ids)[pd.Index(item_ids).duplicated()].unique().tolist()
    if dup:
        raise InvalidInputError(f"duplicate item ids {dup[:5]}; nothing was published")
    if codebook.levels != levels:
        raise FeatureStoreError(f"codebook {codebook.version} has {codebook.levels} levels; this store's "
                                f"feature view has {levels}")
    return emb


def onboarding_items(items: pd.DataFrame) -> pd.DataFrame:
    """Items to onboard, checked like the data contract checks a catalogue (every onboarding path comes here):
    printable ids of at most 256 characters, unique, and texts of at most MAX_TEXT_CHARS characters."""
    from semalign.data import ID_EXPECTED, MAX_TEXT_CHARS, bad_ids

    if "item_id" not in items:
        raise DataValidationError(None, None, "item_id", "an item_id column (and text, optionally image_path)")
    items = items.copy()
    missing = items["item_id"].map(lambda v: v is None or (isinstance(v, float) and v != v) or str(v).strip() == "")
    if missing.any():
        raise DataValidationError(None, int(np.flatnonzero(missing.to_numpy())[0]) + 1, "item_id",
                                  "a non-empty id; nothing was onboarded", int(missing.sum()))
    items["item_id"] = items["item_id"].astype(str)
    bad = bad_ids(items["item_id"])
    if bad.any():
        raise DataValidationError(None, int(np.flatnonzero(bad)[0]) + 1, "item_id",
                                  f"{ID_EXPECTED}; nothing was onboarded", int(bad.sum()))
    if "text" in items:
        long = items["text"].map(lambda t: isinstance(t, str) and len(t) > MAX_TEXT_CHARS).to_numpy(bool)
        if long.any():
            raise DataValidationError(None, int(np.flatnonzero(long)[0]) + 1, "text",
                                      f"at most {MAX_TEXT_CHARS:,} characters; nothing was onboarded", int(long.sum()))
    if items["item_id"].duplicated().any():
        dup = items["item_id"].duplicated().to_numpy()
        raise DataValidationError(None, int(np.flatnonzero(dup)[0]) + 1, "item_id",
                                  f"unique ids in the onboarding batch; repeated: {items.loc[dup, 'item_id'].tolist()[:5]}; "
                                  "nothing was onboarded", int(dup.sum()))
    return items


def content_vectors(content, n: int, outcome: str) -> np.ndarray | None:
    """Validated text-tower vectors [n, dt] (float32, finite), or None."""
    if content is None:
        return None
    raw = np.asarray(content, dtype=np.float32)
    if raw.ndim != 2 or len(raw) != n or raw.shape[1] == 0:
        raise InvalidInputError(f"content vectors must have shape ({n}, dim); got {tuple(raw.shape)}; {outcome}")
    if not np.isfinite(raw).all():
        bad = int(np.flatnonzero(~np.isfinite(raw).all(1))[0])
        raise InvalidInputError(f"content vector of row {bad} is not finite; {outcome}")
    return raw


def timestamps(available_at, n: int) -> pd.Series:
    if available_at is None:
        return pd.Series([EPOCH] * n)
    ts = pd.to_datetime(pd.Series(list(available_at)), utc=True)
    if len(ts) != n:
        raise InvalidInputError(f"available_at has {len(ts)} values for {n} items")
    return ts.fillna(EPOCH)
