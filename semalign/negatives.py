"""Sampled negatives for implicit feedback (interactions without `label` or `rating`: every row is a positive).

Per positive, `per_positive` negatives at the positive's own timestamp, drawn from the items available at that
time (an item's `available_at`, or its first positive, whichever is earlier) that the user has not engaged with up
to that time, uniformly or weighted by popularity (1 + the item's positives strictly before that time).

Every draw depends only on events at or before its own timestamp, and its randomness only on (seed, user id,
timestamp, slot): a validation or test window's negatives come from what was known in that window, a training
window's never depend on a later one, and partitions that arrive later leave earlier negatives as they were.
A later engagement is the future: an item the user engages with tomorrow can be today's negative.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from pandas.util import hash_array

Weighting = Literal["uniform", "popularity"]
NEVER = np.iinfo(np.int64).max   # an item with no known availability: never drawn
_ROUNDS = 24                     # rejection rounds before a group's remaining slots are drawn from its exact pool
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03), np.uint64(0x8CB92BA72F3D8DD7)


@dataclass(frozen=True)
class NegativeSampling:
    per_positive: int = 1
    weighting: Weighting = "uniform"
    seed: int = 0

    def spec(self) -> dict:
        return asdict(self)


def _mix(x) -> np.ndarray:
    """splitmix64's finalizer: a well-spread 64-bit value from any 64-bit input (wraps on overflow by design)."""
    x = np.array(x, dtype=np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_negatives(user_id: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int,
                     available_at: np.ndarray | None, cfg: NegativeSampling
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Negatives for the positives (user_id[k], item[k] (catalogue position), ts[k] (unix s)).

    Returns (user ids, item positions, timestamps) of the negatives and what was sampled. One user's positives at
    one timestamp share a draw of distinct items, so no (user, item, timestamp) repeats."""
    with np.errstate(over="ignore"):  # the hashing multiplies modulo 2**64
        return _sample(user_id, item, ts, n_items, available_at, cfg)


def _sample(user_id, item, ts, n_items, available_at, cfg):
    user_id = np.asarray(user_id, dtype=object)
    item, ts = np.asarray(item, np.int64), np.asarray(ts, np.int64)
    users, ucode = np.unique(user_id, return_inverse=True)
    ucode = ucode.astype(np.int64)
    first = np.full(n_items, NEVER, np.int64)
    np.minimum.at(first, item, ts)
    avail = first if available_at is None else np.minimum(first, np.asarray(available_at, np.int64))
    by_avail = np.lexsort((np.arange(n_items), avail))   # availability, then catalogue position
    avail_sorted = avail[by_avail]
    # first engagement per (user, item): a candidate is refused when it is at or before the draw's time
    pair = ucode * n_items + item
    o = np.lexsort((ts, pair))
    pk = pair[o]
    head = np.r_[True, pk[1:] != pk[:-1]]
    eng_key, eng_ts = pk[head], ts[o][head]
    o = np.lexsort((item, ts))                            # positives by time: the popularity draws
    pos_ts, pos_item = ts[o], item[o]
    # groups: one user at one timestamp
    o = np.lexsort((ts, ucode))
    gu, gt = ucode[o], ts[o]
    start = np.r_[True, (gu[1:] != gu[:-1]) | (gt[1:] != gt[:-1])] if len(o) else np.zeros(0, bool)
    g_user, g_ts = gu[start], gt[start]
    g_need = np.diff(np.r_[np.flatnonzero(start), len(o)]) * cfg.per_positive
    seed = _mix(np.uint64(cfg.seed % 2**64) ^ _C3)
    g_seed = _mix(hash_array(users)[g_user] ^ _mix(g_ts.astype(np.uint64) ^ seed))
    n_avail = np.searchsorted(avail_sorted, g_ts, side="right")
    n_before = np.searchsorted(pos_ts, g_ts, side="left")

    slot_group = np.repeat(np.arange(len(g_user)), g_need)
    g_start = np.cumsum(g_need) - g_need       # a group's slots are contiguous
    slot_idx = (np.arange(len(slot_group)) - np.repeat(g_start, g_need)).astype(np.uint64)
    chosen = np.full(len(slot_group), -1, np.int64)

    def engaged(g, cand):
        key = g_user[g] * n_items + cand
        at = np.minimum(np.searchsorted(eng_key, key), max(len(eng_key) - 1, 0))
        return (eng_key[at] == key) & (eng_ts[at] <= g_ts[g]) if len(eng_key) else np.zeros(len(g), bool)

    for r in range(_ROUNDS):
        open_ = np.flatnonzero(chosen < 0)
        open_ = open_[n_avail[slot_group[open_]] > 0]
        if not len(open_):
            break
        g = slot_group[open_]
        h = _mix(g_seed[g] ^ _mix(slot_idx[open_] * _C1 + np.uint64(r + 1) * _C2))
        na, u = n_avail[g], _unit(h)
        cand = by_avail[np.minimum((u * na).astype(np.int64), na - 1)]
        if cfg.weighting == "popularity":
            nb = n_before[g]
            h2 = _mix(h ^ _C3)
            from_past = _unit(h2) * (na + nb) >= na      # weight 1 + positives before: a past positive's item
            pick = np.minimum((_unit(_mix(h2)) * nb).astype(np.int64), np.maximum(nb - 1, 0))
            cand = np.where(from_past, pos_item[pick] if len(pos_item) else cand, cand)
        ok = ~engaged(g, cand)
        filled = chosen >= 0
        taken = np.sort(slot_group[filled] * n_items + chosen[filled])
        gkey = g * n_items + cand
        ok &= ~np.isin(gkey, taken, assume_unique=False)
        idx = np.flatnonzero(ok)
        _, first_of = np.unique(gkey[idx], return_index=True)   # a repeat within this round: the lowest slot keeps it
        keep = idx[np.sort(first_of)]
        chosen[open_[keep]] = cand[keep]

    fallback = 0
    for gi in np.unique(slot_group[chosen < 0]):          # pools nearly exhausted: draw from the exact pool
        group = np.arange(g_start[gi], g_start[gi] + g_need[gi])
        slots, mine = group[chosen[group] < 0], chosen[group][chosen[group] >= 0]
        u_, t_ = g_user[gi], g_ts[gi]
        lo, hi = np.searchsorted(eng_key, [u_ * n_items, (u_ + 1) * n_items])
        seen = eng_key[lo:hi][eng_ts[lo:hi] <= t_] - u_ * n_items
        pool = np.setdiff1d(by_avail[: n_avail[gi]], np.concatenate([seen, mine]))
        if not len(pool):
            continue
        fallback += 1
        w = np.ones(len(pool))
        if cfg.weighting == "popularity":
            w += np.bincount(pos_item[: n_before[gi]], minlength=n_items)[pool]
        key = np.log(np.maximum(_unit(_mix(g_seed[gi] ^ _mix(pool.astype(np.uint64) * _C2))), 1e-300)) / w
        take = pool[np.argsort(-key, kind="stable")[: len(slots)]]  # weighted sampling without replacement
        chosen[slots[: len(take)]] = take

    got = chosen >= 0
    sg = slot_group[got]
    stats = {**cfg.spec(), "positives": int(len(item)), "sampled": int(got.sum()),
             "short": int((~got).sum()), "exact_pool_draws": int(fallback),
             "items_never_available": int((avail == NEVER).sum())}
    return users[g_user[sg]], chosen[got], g_ts[sg], stats
