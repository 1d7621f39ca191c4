"""Ranking metrics (AUC, GAUC, LogLoss) and paired bootstrap over users. numpy only.

All metrics accept per-event weights so that a bootstrap resample of users is a reweighting of events:
the sort by score is done once and each resample costs O(n).
"""
from __future__ import annotations

import numpy as np


class SortedScores:
    """Scores of one model on one set of events, sorted once for repeated weighted AUCs."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        order = np.argsort(p, kind="stable")
        self.order = order
        self.y = y[order].astype(np.float64)
        self.p = np.asarray(p, dtype=np.float64)[order]
        # tie groups: events with equal scores count half
        self.group_start = np.r_[True, np.diff(self.p) != 0]

    def auc(self, w: np.ndarray | None = None) -> float:
        w = np.ones(len(self.y)) if w is None else np.asarray(w, dtype=np.float64)[self.order]
        wp, wn = w * self.y, w * (1 - self.y)
        tot_p, tot_n = wp.sum(), wn.sum()
        if tot_p == 0 or tot_n == 0:
            return float("nan")
        gid = np.cumsum(self.group_start) - 1
        gn = np.bincount(gid, weights=wn)
        gp = np.bincount(gid, weights=wp)
        neg_below = np.cumsum(gn) - gn
        return float((gp * (neg_below + 0.5 * gn)).sum() / (tot_p * tot_n))


def auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    return SortedScores(np.asarray(y), np.asarray(p)).auc(w)


def logloss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    w = np.ones(len(y)) if w is None else w
    return float((ll * w).sum() / max(w.sum(), 1e-12))


def per_user_auc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of each user that has both classes: (user ids, auc, number of events)."""
    order = np.lexsort((p, users))
    u, yy, pp = users[order], y[order].astype(np.float64), p[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    ends = np.r_[starts[1:], len(u)]
    out_u, out_auc, out_n = [], [], []
    for s, e in zip(starts, ends):
        ys = yy[s:e]
        npos = ys.sum()
        if npos == 0 or npos == e - s:
            continue
        out_u.append(u[s])
        out_auc.append(SortedScores(ys, pp[s:e]).auc())
        out_n.append(e - s)
    return np.array(out_u), np.array(out_auc), np.array(out_n, dtype=np.float64)


def gauc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> float:
    _, a, n = per_user_auc(y, p, users)
    return float((a * n).sum() / n.sum()) if len(a) else float("nan")


def metric_set(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> dict:
    return {"auc": auc(y, p), "gauc": gauc(y, p, users), "logloss": logloss(y, p), "n_events": int(len(y))}


class BootstrapFrame:
    """One (seed, bucket) test frame with every model's predictions, resampled by user."""

    def __init__(self, y: np.ndarray, users: np.ndarray, preds: dict[str, np.ndarray]):
        self.y = y
        self.uniq, self.uinv = np.unique(users, return_inverse=True)
        self.sorted = {m: SortedScores(y, p) for m, p in preds.items()}
        self.per_user = {}
        for m, p in preds.items():
            uu, a, n = per_user_auc(y, p, users)
            self.per_user[m] = (np.searchsorted(self.uniq, uu), a, n)
        self.ll = {m: -(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
                   for m, p in preds.items()}

    def metrics(self, model: str, user_weights: np.ndarray) -> dict:
        w = user_weights[self.uinv]
        ui, a, n = self.per_user[model]
        wu = user_weights[ui] * n
        return {"auc": self.sorted[model].auc(w),
                "gauc": float((a * wu).sum() / wu.sum()) if wu.sum() > 0 else float("nan"),
                "logloss": float((self.ll[model] * w).sum() / w.sum())}


def paired_bootstrap(frames: list[BootstrapFrame], model: str, baseline: str, n_boot: int = 200,
                     seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Delta model - baseline averaged over frames (seeds); 95% interval from resampling users within each
    frame, the same resample for both models. Returns metric -> (mean, low, high)."""
    rng = np.random.default_rng(seed)
    point = {k: np.nanmean([f.metrics(model, np.ones(len(f.uniq)))[k] - f.metrics(baseline, np.ones(len(f.uniq)))[k]
                            for f in frames]) for k in ("auc", "gauc", "logloss")}
    draws = {k: [] for k in point}
    for _ in range(n_boot):
        per = {k: [] for k in point}
        for f in frames:
            w = np.bincount(rng.integers(0, len(f.uniq), len(f.uniq)), minlength=len(f.uniq)).astype(np.float64)
            a, b = f.metrics(model, w), f.metrics(baseline, w)
            for k in point:
                per[k].append(a[k] - b[k])
        for k in point:
            draws[k].append(np.nanmean(per[k]))
    return {k: (float(point[k]), float(np.nanpercentile(draws[k], 2.5)), float(np.nanpercentile(draws[k], 97.5)))
            for k in point}
