"""Report of whole refreshes (`semalign run`, Feast + MLflow + Prefect included) on synthetic catalogues: wall time,
peak RSS and each Prefect task's time, read from the run's own records.

Produce a run (embedded defaults, a fresh home per size):
    semalign data synth --out /tmp/syn10k --items 10000
    SEMALIGN_HOME=/tmp/h10k /usr/bin/time -v semalign run --data /tmp/syn10k > /tmp/r10k.out 2> /tmp/r10k.err
then
    python bench/whole_refresh_report.py --run 10000:/tmp/h10k:/tmp/r10k.err --run 30000:... --tag whole_refresh_cpu
writes bench/results/TAG.json and TAG.md. Task times come from the run's Prefect database (SEMALIGN_HOME/prefect),
wall time and peak RSS from GNU time's -v report.
"""
from __future__ import annotations

import argparse
import re
import sqlite3
from datetime import datetime
from pathlib import Path

from harness import write


def task_seconds(home: Path) -> dict[str, float]:
    con = sqlite3.connect(home / "prefect" / "prefect.db")
    rows = con.execute("select name, start_time, end_time from task_run where end_time is not null "
                       "order by start_time").fetchall()
    out = {}
    for name, start, end in rows:
        label = re.sub(r"-[0-9a-f]{3}$", "", name)
        out[label] = round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)
    return out


def gnu_time(path: Path) -> dict:
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    parts = [float(p) for p in wall.split(":")]
    secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    status = int(re.search(r"Exit status: (\d+)", text).group(1))
    return {"wall_s": round(secs, 1), "peak_rss_gib": round(rss_kb / 1024 ** 2, 2), "exit_status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="ITEMS:HOME:GNU_TIME_LOG")
    ap.add_argument("--tag", default="whole_refresh_cpu")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    runs = []
    for spec in a.run:
        items, home, log = spec.split(":")
        runs.append({"items": int(items), **gnu_time(Path(log)), "tasks_s": task_seconds(Path(home))})
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks_s"]))
    head = "| | " + " | ".join(f"{r['items']:,} items" for r in runs) + " |"
    lines = ["Embedded defaults (Feast sqlite + parquet, MLflow sqlite, in-process Prefect) on `semalign data synth` "
             "catalogues, 10 events per item; how each run was made: this script's docstring.", "", head, "|---" * (len(runs) + 1) + "|",
             "| wall time (process) | " + " | ".join(f"{r['wall_s']:,.0f} s" for r in runs) + " |",
             "| peak RSS | " + " | ".join(f"{r['peak_rss_gib']:.2f} GiB" for r in runs) + " |",
             "| exit status | " + " | ".join(str(r["exit_status"]) for r in runs) + " |"]
    for t in tasks:
        lines.append(f"| task: {t} | " + " | ".join(f"{r['tasks_s'].get(t, float('nan')):,.1f} s" for r in runs) + " |")
    if a.note:
        lines += ["", a.note]
    write(a.tag, {"runs": runs, "note": a.note}, lines, "Whole `semalign run` per catalogue size")


if __name__ == "__main__":
    main()
