"""`semalign run` end to end on one catalogue from several sources: the summary table of runs made by hand.

Each run is `semalign run --data SOURCE --home HOME --json > RUN.json`, one at a time, OMP_NUM_THREADS=1 (for
MovieLens-100K: (a) the local folder, (b) S3 daily partitions, (c) Postgres tables, (d) positives only, its
negatives sampled in-product). This reads each run's JSON and its home's MLflow run (data hash, lineage tags) and
writes one table: the dataset hash, the events, the wall time, the served model's AUC / GAUC overall and on unseen
items, the partitions read.

  python bench/studies/sources_runs.py --run a_local=RUN.json:HOME --run b_s3=RUN.json:HOME ... [--tag T]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402


def tags(home: Path, run_id: str) -> dict:
    with sqlite3.connect(home / "mlflow.db") as db:
        return dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN.json:HOME")
    ap.add_argument("--note", action="append", default=[], help="a line under the table (how the runs were made)")
    ap.add_argument("--tag", default="sources_runs_movielens")
    args = ap.parse_args()
    rows = {}
    for spec in args.run:
        name, rest = spec.split("=", 1)
        path, home = rest.rsplit(":", 1)
        res = json.loads(Path(path).read_text())
        # a run on unchanged input logs no MLflow run: its model is the one before, the read is in its summary
        t = tags(Path(home), res["run_id"]) if res.get("run_id") else {}
        ev = (res.get("evaluation") or {}).get("challenger") or {b: {"auc": float("nan"), "gauc": float("nan")}
                                                                for b in ("all", "unseen")}
        parts = res["data"].get("partitions") or {}
        rows[name] = {"data_hash": t.get("data_hash", "(unchanged)"), "source": res["data"].get("source", "folder"),
                      "partitions": parts.get("read"), "from_source": parts.get("from_source"),
                      "from_copy": parts.get("from_copy"), "note": res.get("note"),
                      "interactions": res["data"]["interactions"], "positive_rate": res["data"]["positive_rate"],
                      "negatives": res["data"].get("negatives"), "wall_s": res.get("wall_s"),
                      "auc_all": ev["all"]["auc"], "gauc_all": ev["all"]["gauc"],
                      "auc_unseen": ev["unseen"]["auc"], "gauc_unseen": ev["unseen"]["gauc"],
                      "promoted": res.get("promoted"), "reused": {k: res[k].get("reused") for k in
                                                                   ("encoder", "codebook", "ranker") if k in res}}
    md = ["| run | data hash | events | positive rate | partitions (fetched / from copy) | wall s | AUC all | "
          "GAUC all | AUC unseen | GAUC unseen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        parts = "-" if r["partitions"] is None else f"{r['partitions']} ({r['from_source']} / {r['from_copy']})"
        md.append(f"| {name} | {r['data_hash']} | {r['interactions']:,} | {r['positive_rate']:.3f} | {parts} | "
                  f"{r['wall_s']:.0f} | {100 * r['auc_all']:.2f} | {100 * r['gauc_all']:.2f} | "
                  f"{100 * r['auc_unseen']:.2f} | {100 * r['gauc_unseen']:.2f} |")
    md += [""] + args.note
    harness.write(args.tag, {"runs": rows, "notes": args.note}, md,
                  "semalign run on one catalogue from several sources")


if __name__ == "__main__":
    main()
