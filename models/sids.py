"""Utilities on semantic-ID code arrays [n, levels]: the dedup level that makes every SID unique, churn between
two assignments, and code quality metrics."""
from __future__ import annotations

import numpy as np
import torch


def dedup_level(codes: np.ndarray, tie_order: np.ndarray | None = None,
                taken: dict[tuple, int] | None = None) -> np.ndarray:
    """Extra level that makes every full SID unique: within a group of identical codes, items get 0, 1, ...
    in `tie_order` (e.g. rank of the item id). `taken` maps already-published code tuples to the next free
    dedup index, so onboarded items never reuse one."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, inv = np.unique(_row_keys(codes), return_inverse=True)
    order = np.lexsort((np.arange(n) if tie_order is None else np.asarray(tie_order), inv))
    g = inv[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, dtype=np.int64)
    out[order] = rank
    if taken:
        offset = np.array([taken.get(tuple(int(c) for c in row), 0) for row in codes], dtype=np.int64)
        out = out + offset
    return out


def sid_churn(old: np.ndarray, new: np.ndarray) -> dict:
    """Share of items whose SID changed (overall and per level); rows must be the same items."""
    if old.shape != new.shape:
        raise ValueError(f"churn needs the same items and levels: {old.shape} vs {new.shape}")
    if len(old) == 0:
        return {"churn": 0.0, "per_level": []}
    diff = old != new
    return {"churn": float(diff.any(1).mean()), "per_level": [float(d) for d in diff.mean(0)]}


def _row_keys(codes: np.ndarray) -> np.ndarray:
    """One int64 per SID row (rows of small codes pack exactly; otherwise fall back to row-unique ids)."""
    codes = np.asarray(codes, dtype=np.int64)
    base = int(codes.max()) + 1 if codes.size else 1
    if base ** codes.shape[1] < 2 ** 62:
        return (codes * (base ** np.arange(codes.shape[1] - 1, -1, -1, dtype=np.int64))).sum(1)
    return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)


def code_metrics(codes, k: int, relative_recon_error: float) -> dict:
    """Utilisation and perplexity per level, collisions of full SIDs. `codes` [n, levels]: numpy, or a torch
    tensor, counted where it lives (a GPU build does not copy its codes to the host for this)."""
    if isinstance(codes, torch.Tensor):
        return _code_metrics_torch(codes, k, relative_recon_error)
    _, counts = np.unique(_row_keys(codes), return_counts=True)
    shared = counts[counts > 1].sum()
    util = [float(len(np.unique(codes[:, lvl])) / k) for lvl in range(codes.shape[1])]
    ent = []
    for lvl in range(codes.shape[1]):
        p = np.bincount(codes[:, lvl], minlength=k) / len(codes)
        p = p[p > 0]
        ent.append(float(np.exp(-(p * np.log(p)).sum())))
    return {"utilisation": util, "perplexity": ent, "collision_rate": float(shared / len(codes)),
            "max_collision_group": int(counts.max()), "unique_sids": int(len(counts)),
            "relative_recon_error": relative_recon_error}


def _code_metrics_torch(codes: torch.Tensor, k: int, relative_recon_error: float) -> dict:
    codes = codes.long()
    base = int(codes.max()) + 1 if codes.numel() else 1
    if base ** codes.shape[1] < 2 ** 62:
        keys = (codes * (base ** torch.arange(codes.shape[1] - 1, -1, -1, device=codes.device))).sum(1)
    else:
        keys = torch.unique(codes, dim=0, return_inverse=True)[1]
    counts = torch.unique(keys, return_counts=True)[1]
    per_level = [torch.bincount(codes[:, lvl], minlength=k).double() for lvl in range(codes.shape[1])]
    util, ent = [], []
    for cnt in per_level:
        p = cnt[cnt > 0] / len(codes)
        util.append(float((cnt > 0).sum()) / k)
        ent.append(float(torch.exp(-(p * torch.log(p)).sum())))
    return {"utilisation": util, "perplexity": ent, "collision_rate": float(counts[counts > 1].sum()) / len(codes),
            "max_collision_group": int(counts.max()), "unique_sids": int(len(counts)),
            "relative_recon_error": relative_recon_error}


def sid_translation(old_ids, old_codes: np.ndarray, new_ids, new_codes: np.ndarray) -> dict:
    """What a rebuilt codebook changed: for the items both versions hold, the old and new full SIDs (codes with
    the dedup level, [n, L+1] each) and the share that moved per level (a level counts as moved when it or any
    level above it changed, so "level 1" is the share whose 2-level prefix moved). Returns {"shared": item ids,
    "old": codes, "new": codes, "only_old": ids, "only_new": ids, "churn": share of shared items whose SID
    changed, "per_level": [...]} ."""
    old_pos = {i: k for k, i in enumerate(old_ids)}
    new_pos = {i: k for k, i in enumerate(new_ids)}
    shared = [i for i in new_ids if i in old_pos]
    o = np.asarray(old_codes)[[old_pos[i] for i in shared]].reshape(len(shared), -1)
    n = np.asarray(new_codes)[[new_pos[i] for i in shared]].reshape(len(shared), -1)
    if o.shape != n.shape:
        raise ValueError(f"the versions' SIDs have different depths: {o.shape[1]} vs {n.shape[1]} levels")
    moved = np.cumsum(o != n, axis=1) > 0
    return {"shared": shared, "old": o, "new": n, "only_old": [i for i in old_ids if i not in new_pos],
            "only_new": [i for i in new_ids if i not in old_pos],
            "churn": float(moved[:, -1].mean()) if len(shared) else 0.0,
            "per_level": [float(m) for m in moved.mean(0)] if len(shared) else []}


def nearest(vectors: np.ndarray, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine: (rows [q, k], scores [q, k]) of `vectors` [n, d] closest to each of `queries`
    [q, d], best first; `exclude[j]` lists rows query j may not return (the item itself). Zero vectors score 0."""
    def unit(x):
        x = np.asarray(x, np.float32)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    base, q = unit(vectors), unit(queries)
    k = min(k, len(base))
    rows, scores = np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
    for s in range(0, len(q), chunk):
        sim = q[s:s + chunk] @ base.T
        if exclude is not None:
            for j, ex in enumerate(exclude[s:s + chunk]):
                sim[j, np.asarray(ex, np.int64)] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, 1), axis=1, kind="stable")
        rows[s:s + chunk] = np.take_along_axis(top, order, 1)
        scores[s:s + chunk] = np.take_along_axis(sim, rows[s:s + chunk], 1)
    return rows, scores


def first_level_chance(codes: np.ndarray) -> float:
    """The chance two items drawn at random share their first-level code: sum over codes of their share squared."""
    share = np.bincount(np.asarray(codes)[:, 0]) / max(len(codes), 1)
    return float((share ** 2).sum())
