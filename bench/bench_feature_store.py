"""Benchmark: online SID reads and onboarding through the feature-store plugin.

Online reads: p50/p99 of `SemanticIdStore.semantic_ids(items, version=V)` for 1, 100 and 1,000 items on the
sqlite and Redis online stores, against two references in the same process reading the same keys:
  raw      sqlite3 `SELECT ... WHERE entity_key IN (...)` / redis-py pipeline of HMGET, keys pre-serialized,
           values left as bytes (the floor: what the store itself costs)
  feast    Feast's own `FeatureStore.get_online_features` for the same features and rows (the peer SDK)
Onboarding (needs a home with a published MovieLens run; towers warm): one new item's latency from text to
servable SID (onboard() returns after the online write), then throughput for 1,000 items in one call.

  python bench/bench_feature_store.py [--items 20000] [--reps 200] [--home ~/.semalign] [--skip-onboarding] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from harness import percentiles as pct
from harness import RESULTS, timings, write


def timed(fn, reps):
    return timings(fn, reps, warmup=2)


def read_bench(backend: str, n_items: int, reps: int, tmp: Path) -> list[dict]:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from semalign.config import Settings
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.models.codebook import build_codebook

    project = f"bench{uuid.uuid4().hex[:8]}"
    kw = {"feast_online": "redis"} if backend == "redis" else {}
    s = Settings(home=tmp / backend, feast_project=project, **kw)
    store = SemanticIdStore(s)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_items, 128)).astype(np.float32)
    cb = build_codebook(x, levels=3, codes=256, iters=10, data_hash=project)
    ids = [f"item-{i}" for i in range(n_items)]
    t0 = time.perf_counter()
    store.publish(cb, ids, x)
    publish_s = time.perf_counter() - t0
    fs, v = store.fs, cb.version
    feats = [f"item_semantic_id:sid_{lvl}" for lvl in range(3)] + ["item_semantic_id:sid_dedup"]
    fv = store.view("item_semantic_id")
    rows = []
    try:
        if backend == "redis":
            import redis

            host, port = s.redis_url.split(",")[0].rsplit(":", 1)
            client = redis.Redis(host=host, port=int(port))
            online = fs._get_provider().online_store
            fields = online._generate_hset_keys_for_features(fv, [f.split(":")[1] for f in feats])[1]
        else:
            conn = sqlite3.connect(s.feature_repo_dir / "data" / "online_store.db")
            table = f"{project}_item_semantic_id"
        for n in (1, 100, 1000):
            sel = [ids[i] for i in rng.choice(n_items, n, replace=False)]
            keys = [serialize_entity_key(EntityKey(join_keys=["codebook_version", "item_id"],
                                                   entity_values=[Value(string_val=v), Value(string_val=i)]), 3)
                    for i in sel]
            if backend == "redis":
                rkeys = online._generate_redis_keys_for_entities(fs.config, [
                    EntityKey(join_keys=["codebook_version", "item_id"], entity_values=[Value(string_val=v), Value(string_val=i)])
                    for i in sel])

                def raw():
                    pipe = client.pipeline(transaction=False)
                    for k in rkeys:
                        pipe.hmget(k, fields)
                    res = pipe.execute()
                    assert all(r[0] is not None for r in res)
            else:
                q = f'SELECT entity_key, feature_name, value FROM "{table}" WHERE entity_key IN ({",".join("?" * n)})'

                def raw():
                    res = conn.execute(q, keys).fetchall()
                    assert len(res) == 4 * n

            rows_ent = [{"item_id": i, "codebook_version": v} for i in sel]

            def peer():
                fs.get_online_features(features=feats, entity_rows=rows_ent).to_dict()

            def ours():
                store.semantic_ids(sel, version=v)

            r = min(reps, 60) if n == 1000 else reps
            t_raw, t_peer, t_ours = pct(timed(raw, r)), pct(timed(peer, r)), pct(timed(ours, r))
            rows.append({"backend": backend, "items": n, "semalign": t_ours, "raw_client": t_raw, "feast_sdk": t_peer,
                         "ratio_vs_raw_p50": t_ours["p50_ms"] / t_raw["p50_ms"],
                         "ratio_vs_feast_sdk_p50": t_ours["p50_ms"] / t_peer["p50_ms"],
                         "publish_s": publish_s, "catalogue": n_items})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        fs.teardown()
    return rows


def onboarding_bench(home: Path) -> dict:
    from semalign.config import Settings
    from semalign.feature_repo.store import open_store

    s = Settings(home=home)
    store = open_store(s)
    v = store.current_version()
    if v is None:
        raise SystemExit(f"no published version under {home}: run `semalign run` first or pass --skip-onboarding")
    words = ("heist drama comedy space war romance western robot detective family musical noir island winter "
             "desert river city mountain ghost dragon pirate spy doctor lawyer chef teacher").split()
    rng = np.random.default_rng(1)
    tag = uuid.uuid4().hex[:6]

    def text():
        return "A " + " ".join(rng.choice(words, 12)) + " film."

    store.onboard(pd.DataFrame({"item_id": [f"warm-{tag}"], "text": [text()]}))  # loads towers + encoder once
    one = []
    for i in range(30):
        iid = f"one-{tag}-{i}"
        t = time.perf_counter()
        out = store.onboard(pd.DataFrame({"item_id": [iid], "text": [text()]}))
        one.append(time.perf_counter() - t)
        assert out["onboarded"].all()
    got = store.semantic_ids([f"one-{tag}-{i}" for i in range(30)])  # servable right after
    batch = pd.DataFrame({"item_id": [f"batch-{tag}-{i}" for i in range(1000)], "text": [text() for _ in range(1000)]})
    t = time.perf_counter()
    store.onboard(batch)
    batch_s = time.perf_counter() - t
    return {"version": v, "one_item": pct(one), "servable_after_onboard": bool(len(got) == 30),
            "batch_1000_s": batch_s, "batch_items_per_s": 1000 / batch_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("SEMALIGN_HOME", Path.home() / ".semalign")))
    ap.add_argument("--skip-onboarding", action="store_true")
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reads = [r for b in args.backends.split(",") for r in read_bench(b, args.items, args.reps, Path(tmp))]
    onboarding = None if args.skip_onboarding else onboarding_bench(args.home)
    res = {"online_reads": reads, "onboarding": onboarding}
    md = [f"Catalogue: {args.items} items, 3 levels x 256 codes.",
          "semalign = `SemanticIdStore.semantic_ids(items, version=V)` (returns a DataFrame); raw = sqlite3 / redis-py "
          "pipeline on pre-serialized keys, bytes not decoded; feast = `FeatureStore.get_online_features`.", "",
          "| store | items | semalign p50 / p99 ms | raw p50 / p99 ms | Feast SDK p50 / p99 ms | semalign / raw | semalign / Feast SDK |",
          "|---|---|---|---|---|---|---|"]
    for r in reads:
        md.append(f"| {r['backend']} | {r['items']} | {r['semalign']['p50_ms']:.2f} / {r['semalign']['p99_ms']:.2f} | "
                  f"{r['raw_client']['p50_ms']:.2f} / {r['raw_client']['p99_ms']:.2f} | "
                  f"{r['feast_sdk']['p50_ms']:.2f} / {r['feast_sdk']['p99_ms']:.2f} | {r['ratio_vs_raw_p50']:.2f}x | "
                  f"{r['ratio_vs_feast_sdk_p50']:.2f}x |")
    if onboarding:
        o = onboarding
        md += ["", f"Onboarding (real MiniLM text tower + encoder + codebook {o['version']}, warm, CPU): one item "
               f"p50 {o['one_item']['p50_ms']:.1f} ms / p99 {o['one_item']['p99_ms']:.1f} ms until its SID is in the "
               f"online store; 1,000 items in one call {o['batch_1000_s']:.2f} s = {o['batch_items_per_s']:.0f} items/s."]
    write("feature_store_cpu", res, md, "Feature store: online SID reads and onboarding", args.out)


if __name__ == "__main__":
    main()
