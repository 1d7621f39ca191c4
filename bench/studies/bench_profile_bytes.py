"""Benchmark: the online store's bytes per item under the two serving profiles, and scoring latency for each.

Profiles (SEMALIGN_SERVING_PROFILE): `dense` holds per item its SID row (3 codes + dedup), the aligned vector (128
floats) and the text-tower vector (384 floats) the served `aligned_content` ranker reads; `compact` holds the SID row
only, for the `sid` ranker (codes -> SID n-gram rows + the codebook's centroids). The same synthetic catalogue is
published under each profile into
  - Redis: a private `redis-server` on a free loopback port, `INFO memory` used_memory before/after;
  - sqlite (the embedded default): the online store file's size before/after.
Reference in the same run: the payload itself (the bytes of the values the ranker reads: its physical limit), so the
ratio is the store's overhead per item.

Scoring: 1 user x 100 candidates with a 50-item history through `RankerScorer.score_rows` (online feature reads +
the model), a ranker of each profile's variant on the same store (weights at their initialisation: latency does not
depend on them). HTTP is the same for both and is measured by bench_serve.py.

  python bench/studies/bench_profile_bytes.py [--items 20000] [--requests 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results"
LEVELS, CODES, ALIGNED, RAW = 3, 256, 128, 384


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_used(port: int) -> int:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    return int(r.info("memory")["used_memory"])


def catalogue(n: int, seed: int = 0):
    from semalign.models.codebook import build_codebook

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((200, ALIGNED)).astype(np.float32)
    emb = centers[rng.integers(0, 200, n)] + 0.4 * rng.standard_normal((n, ALIGNED)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    raw = rng.standard_normal((n, RAW)).astype(np.float32)
    cb = build_codebook(emb, levels=LEVELS, codes=CODES, iters=10, seed=seed, data_hash=f"bench-{n}")
    return [f"item-{i}" for i in range(n)], emb, raw, cb


def publish(home: Path, online: str, profile: str, port: int, ids, emb, raw, cb):
    from semalign.config import Settings
    from semalign.feature_repo.store import SemanticIdStore

    s = Settings(home=home, feast_project=f"bytes_{profile}", feast_online=online, redis_url=f"127.0.0.1:{port}",
                 serving_profile=profile)
    store = SemanticIdStore(s, levels=LEVELS)
    before = redis_used(port) if online == "redis" else 0
    store.fs  # the registry and empty tables exist before the "before" reading of sqlite
    before_file = sum(f.stat().st_size for f in (home / "feature_repo").rglob("*.db")) if online == "sqlite" else 0
    t0 = time.perf_counter()
    store.publish(cb, ids, emb, content=raw)
    took = time.perf_counter() - t0
    if online == "redis":
        grown = redis_used(port) - before
    else:
        grown = sum(f.stat().st_size for f in (home / "feature_repo").rglob("*.db")) - before_file
    return store, grown, took


def scorer_for(store, variant: str, folder: Path, cb, n_items: int):
    from semalign.deploy.scoring import RankerScorer, save_ranker
    from semalign.models.ranker import ItemTables, Ranker, RankerConfig

    cfg = RankerConfig(variant=variant, id_buckets=max(1, n_items // 10) if variant == "sid" else 0)
    tables = ItemTables(id_vocab=np.arange(n_items + 1), content=np.zeros((1, ALIGNED), np.float32),
                        raw=np.zeros((1, RAW), np.float32), codes=np.zeros((1, LEVELS), np.int64), n_codes=CODES,
                        dedup=np.zeros(1, np.int64), code_vectors=np.stack([c.numpy() for c in cb.centroids]))
    model = Ranker(cfg, tables, 2)
    meta = {"codebook_version": cb.version, "levels": LEVELS, "n_codes": CODES, "content_dim": ALIGNED,
            "code_dim": ALIGNED, "n_user_feats": 2, "raw_dim": RAW if cfg.reads_raw else 0, "label_prior": 0.5,
            "hist_len": 50, "users_version": "bench"}
    save_ranker(model, folder, meta, [f"item-{i}" for i in range(n_items)])
    return RankerScorer(folder, store.settings, store=store)


def time_scoring(scorer, n_items: int, requests: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ts = []
    for r in range(requests + 5):
        cands = [f"item-{i}" for i in rng.choice(n_items, 100, replace=False)]
        hist = [[f"item-{i}" for i in rng.choice(n_items, 50, replace=False)]] * 100
        t0 = time.perf_counter()
        p = scorer.score_rows(np.zeros((100, 2), np.float32), cands, hist)
        if r >= 5:
            ts.append(time.perf_counter() - t0)
        assert p.shape == (100,) and np.isfinite(p).all()
    a = np.asarray(ts) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tag", default="profile_bytes_cpu")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    torch.set_num_threads(1)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="semalign-bytes-"))
    redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                redis_used(port)
                break
            except Exception:
                time.sleep(0.1)
        ids, emb, raw, cb = catalogue(args.items)
        payload = {"dense": LEVELS + 1 + 4 * (ALIGNED + RAW), "compact": LEVELS + 1}  # 1 byte a code (K=256)
        rows = []
        for online in ("sqlite", "redis"):
            for profile, variant in (("dense", "aligned_content"), ("compact", "sid")):
                home = work / f"{online}-{profile}"
                store, grown, took = publish(home, online, profile, port, ids, emb, raw, cb)
                scorer = scorer_for(store, variant, home / "ranker", cb, args.items)
                lat = time_scoring(scorer, args.items, args.requests)
                row = {"online_store": online, "profile": profile, "ranker": variant, "items": args.items,
                       "bytes_per_item": grown / args.items, "payload_bytes_per_item": payload[profile],
                       "overhead_ratio": grown / args.items / payload[profile], "publish_s": took,
                       "score_1x100": lat}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["online_store"], r["profile"]): r for r in rows}
    md = ["| online store | profile (ranker) | bytes / item in the store | payload bytes / item | store / payload | "
          "dense / compact bytes | scoring 1x100 p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = by[(r["online_store"], "dense")]["bytes_per_item"] / by[(r["online_store"], "compact")]["bytes_per_item"]
        md.append(f"| {r['online_store']} | {r['profile']} ({r['ranker']}) | {r['bytes_per_item']:.0f} | "
                  f"{r['payload_bytes_per_item']} | {r['overhead_ratio']:.1f} | "
                  f"{ratio:.1f}x | {r['score_1x100']['p50_ms']:.1f} / {r['score_1x100']['p99_ms']:.1f} |")
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    command = "python bench/studies/bench_profile_bytes.py " + " ".join(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.tag}.json").write_text(json.dumps({"rows": rows, "machine": machine, "command": command}, indent=2))
    text = "\n".join(md) + f"\n\nmachine: {machine}\ncommand: `{command}`\n"
    (OUT / f"{args.tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
