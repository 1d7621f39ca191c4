"""`semalign ids similar` on a refreshed home: are a brand-new item's neighbours coherent with its SID, and do
users engage with them?

For the split's cold items (held out of every training step, so as new as an item gets), each item's content
is encoded on the fly with the published version's encoder (what `ids similar ITEM --text ...` does) and its 10
nearest items by cosine of the aligned vector are searched among everything the version holds, itself excluded.
Reported per dataset, against references in the same run on the same queries:
- share of neighbours with the query's first-level SID code, against the chance two random items share it;
- co-engagement@10: share of neighbours that a user who engaged with the query item (a positive in the test
  window) also engaged with in the training window, for neighbours by the aligned vector, by the frozen
  text-tower vector alone, and drawn at random;
- search cost: one query's exact top-10 through `store.similar` against a bare numpy top-k on the same matrix.

  python bench/studies/similar_items.py --home HOME --data DATA [--home HOME2 --data DATA2 ...] [--queries 500]
(each HOME after `semalign run --data DATA`). Writes bench/results/similar_items.json|.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def co_engagement(neigh_ids: list[list[str]], queries: list[str], test_pos: dict, train_pos: dict) -> float:
    """Mean over queries with engaged users of the share of neighbours those users engaged with in training."""
    shares = []
    for q, ns in zip(queries, neigh_ids):
        users = test_pos.get(q)
        if not users:
            continue
        seen = set().union(*(train_pos.get(u, set()) for u in users))
        shares.append(np.mean([n in seen for n in ns]))
    return float(np.mean(shares)) if shares else float("nan")


def one(home: str, data: str, n_queries: int, k: int, seed: int) -> dict:
    from semalign.config import get_settings
    from semalign.data import settings_split
    from semalign.feature_repo.store import open_store
    from semalign.flows.semantic_ids import ingest
    from semalign.models.sids import first_level_chance, nearest

    s = get_settings(home=home, data=data)
    ds = ingest(s, data)
    split = settings_split(ds, s)
    store = open_store(s)
    t0 = time.perf_counter()
    index = store.vector_index()
    index_s = time.perf_counter() - t0
    cold = ds.items.iloc[np.sort(split.cold_items)]
    rng = np.random.default_rng(seed)
    cold = cold.iloc[np.sort(rng.choice(len(cold), min(n_queries, len(cold)), replace=False))]
    cols = [c for c in ("item_id", "text", "image_path") if c in cold.columns]
    t0 = time.perf_counter()
    codes, emb, _ = store.encode(cold[cols].reset_index(drop=True), version=index["version"])
    encode_s = time.perf_counter() - t0
    qids = cold["item_id"].astype(str).tolist()

    t0 = time.perf_counter()
    found = store.similar(index, emb, k=k, exclude=qids)
    similar_s = time.perf_counter() - t0
    pos = {i: r for r, i in enumerate(index["item_ids"])}
    t0 = time.perf_counter()
    nearest(index["vectors"], emb, k, [[pos[q]] if q in pos else [] for q in qids])
    bare_s = time.perf_counter() - t0

    shares = float(np.mean([f["shares_first_level"].mean() for f in found]))
    chance = first_level_chance(index["codes"])
    # text-tower neighbours (the frozen content vector the ranker reads beside the aligned one)
    _, ok, _, raw = store.read_online(index["item_ids"], index["version"], index["levels"], with_content=True)
    have_raw = ok.all() and all(r is not None and len(r) for r in raw)
    ev = split.events[split.events["label"] == 1]
    test_pos = ev[ev["part"] == "test"].groupby("item_id")["user_id"].agg(set).to_dict()
    train_pos = ev[ev["part"] == "train"].groupby("user_id")["item_id"].agg(set).to_dict()
    aligned_ids = [f["item_id"].tolist() for f in found]
    res = {"dataset": ds.name, "codebook_version": index["version"], "items": len(index["item_ids"]),
           "queries": len(qids), "k": k,
           "shares_first_level": round(shares, 4), "first_level_chance": round(chance, 4),
           "lift_over_chance": round(shares / chance, 2),
           "co_engagement": {"aligned": round(co_engagement(aligned_ids, qids, test_pos, train_pos), 4)},
           "queries_with_engaged_users": int(sum(1 for q in qids if test_pos.get(q))),
           "seconds": {"read_index": round(index_s, 2), "encode_queries": round(encode_s, 2),
                       "search_per_query_ms": round(1000 * similar_s / len(qids), 3),
                       "bare_topk_per_query_ms": round(1000 * bare_s / len(qids), 3)},
           "search_time_ratio_to_bare_topk": round(similar_s / bare_s, 2)}
    if have_raw:
        raw = np.stack(raw)
        raw_q = raw[[pos[q] for q in qids]]  # cold items are published with their text-tower vectors
        rows, _ = nearest(raw, raw_q, k, [[pos[q]] for q in qids])
        res["co_engagement"]["text_tower"] = round(co_engagement(
            [[index["item_ids"][r] for r in rr] for rr in rows], qids, test_pos, train_pos), 4)
    rand = [[index["item_ids"][r] for r in rng.choice(len(index["item_ids"]), k, replace=False)] for _ in qids]
    res["co_engagement"]["random"] = round(co_engagement(rand, qids, test_pos, train_pos), 4)
    return res


def markdown(res: dict) -> str:
    lines = [f"# Similar items for brand-new items (`semalign ids similar --text`)", "",
             f"Machine: {res['machine']}. Command: `{res['command']}`.", "",
             "Queries: cold items of the split (never trained on), encoded on the fly from their content; "
             f"top-{res['runs'][0]['k']} by cosine of the aligned vector among every item of the published "
             "version, the item itself excluded. Co-engagement@k: share of neighbours that a user who engaged with "
             "the query item in the test window engaged with in the training window. Each HOME after `semalign run "
             "--data DATA` or `semalign codebook build --data DATA` (default settings, seed 0): what is searched is "
             "the published codebook version and its encoder. Timings are of one process on a loaded machine.", "",
             "| dataset | items | queries | share first SID level | chance | lift | co-engagement: aligned | "
             "text tower | random | search ms/query | bare top-k ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ce, sec = r["co_engagement"], r["seconds"]
        lines.append(f"| {r['dataset']} | {r['items']} | {r['queries']} | {r['shares_first_level']:.3f} | "
                     f"{r['first_level_chance']:.3f} | {r['lift_over_chance']:.1f}x | {ce['aligned']:.3f} | "
                     f"{ce.get('text_tower', float('nan')):.3f} | {ce['random']:.3f} | "
                     f"{sec['search_per_query_ms']:.2f} | {sec['bare_topk_per_query_ms']:.2f} | "
                     f"{r['search_time_ratio_to_bare_topk']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", action="append", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "similar_items"))
    args = ap.parse_args()
    if len(args.home) != len(args.data):
        sys.exit("give one --data per --home")
    runs = []
    for home, data in zip(args.home, args.data):
        runs.append(one(home, data, args.queries, args.k, args.seed))
        print(json.dumps(runs[-1]), flush=True)
    res = {"command": "python bench/studies/similar_items.py " + " ".join(
               f"--home HOME_{Path(d).name} --data {Path(d).name}" for d in args.data) + f" --queries {args.queries}",
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
           "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
