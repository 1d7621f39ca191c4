"""Benchmark: how long the interactive commands take from process start to their answer, on a refreshed home.

  semalign status --json               champion, challenger, audit history, lock
  semalign ids get ITEM... --json      SIDs of a few items from the online store
  semalign --help

Each command runs `--reps` times as a fresh `python -m semalign.cli` process (wall time, min and median, and the
process's CPU time, user + system, which a busy machine inflates less), against
a reference run the same number of times in the same bench run: the same command's work through the path it took
before (Feast's `SemanticIdStore.semantic_ids` for `ids get`, MLflow's client `Registry(settings).status()` for
`status`, both behind the same CLI import), whose output must equal the command's. `-X importtime` of one run
gives the modules that cost most. Needs a refreshed home (`make run`, or a test home).

  python bench/bench_cli_start.py [--home ~/.semalign] [--items 1 50 181] [--reps 7] [--tag cli_start_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import write

# the reference paths: each command's work as it was done before the direct reads (same output, same CLI import)
REF_IDS = """import json, sys
import semalign.cli
from semalign.config import get_settings
from semalign.feature_repo.store import SemanticIdStore
rows = SemanticIdStore(get_settings()).semantic_ids(sys.argv[1:]).to_dict("records")
sys.stdout.write(json.dumps({"items": rows}, indent=2, default=float) + "\\n")
"""
REF_STATUS = """import json, sys
import semalign.cli
from semalign.config import get_settings
from semalign.deploy.registry import Registry
from semalign.flows.lock import lock_holder
s = get_settings()
reg = Registry(s)
res = reg.status()
res["lock"] = lock_holder(s)
res["history"] = [{k: r[k] for k in ("at", "action", "subject", "from_value", "to_value", "actor")}
                  | {"reason": (r["reason"] or "")[:200]} for r in reg.history(limit=10)]
sys.stdout.write(json.dumps(res, indent=2, default=float) + "\\n")
"""


def run(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, CPU s of the process: user + system, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stdout


def heaviest_imports(argv: list[str], env: dict, n: int = 6) -> list[dict]:
    """The top-level imports that took longest (cumulative, from `python -X importtime`)."""
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env,
                          timeout=300)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum_us, name = line[len("import time:"):].split("|", 2)
        if not name[1:].startswith(" "):  # a top-level import (nested ones are indented by depth)
            rows.append({"module": name.strip(), "cumulative_s": round(int(cum_us) / 1e6, 3)})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:n]


def measure(name: str, cmd: list[str], ref: list[str] | None, env: dict, reps: int) -> dict:
    run(cmd, env)  # warm the page cache for both
    if ref:
        run(ref, env)
    mine, theirs, cpu, cpu_ref, same = [], [], [], [], True
    for _ in range(reps):  # interleaved, so load on the machine falls on both alike
        w, c, out = run(cmd, env)
        mine.append(w)
        cpu.append(c)
        if ref:
            w_ref, c_ref, out_ref = run(ref, env)
            theirs.append(w_ref)
            cpu_ref.append(c_ref)
            same &= json.loads(out) == json.loads(out_ref)
    med = statistics.median
    r = {"command": name, "reps": reps, "min_s": round(min(mine), 3), "median_s": round(med(mine), 3),
         "cpu_median_s": round(med(cpu), 3), "imports": heaviest_imports(cmd, env)}
    if ref:
        r.update(reference_min_s=round(min(theirs), 3), reference_median_s=round(med(theirs), 3),
                 reference_cpu_median_s=round(med(cpu_ref), 3), ratio_median=round(med(mine) / med(theirs), 3),
                 same_output=bool(same))
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("SEMALIGN_HOME", Path.home() / ".semalign")))
    ap.add_argument("--items", nargs="+", default=["1", "50", "181"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tag", default="cli_start_cpu")
    args = ap.parse_args()
    env = {**os.environ, "SEMALIGN_HOME": str(args.home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    py = [sys.executable]
    cases = [
        ("semalign --help", py + ["-m", "semalign.cli", "--help"], None),
        ("semalign status --json", py + ["-m", "semalign.cli", "status", "--json"], py + ["-c", REF_STATUS]),
        (f"semalign ids get {' '.join(args.items)} --json", py + ["-m", "semalign.cli", "ids", "get", *args.items,
                                                                  "--json"], py + ["-c", REF_IDS, *args.items]),
    ]
    rows = []
    for name, cmd, ref in cases:
        r = measure(name, cmd, ref, env, args.reps)
        print(json.dumps(r))
        rows.append(r)
    md = [f"Home: `{args.home}` after `semalign run` (what `make run` runs); the machine's load is the 1-minute "
          "load average at the end.",
          "Wall time of a fresh `python -m semalign.cli ...` process, min and median of the runs, against the same "
          "command's work through the path it took before (Feast's `SemanticIdStore`, MLflow's client), run "
          "interleaved with it; `same output`: the JSON of both equal in every run.", "",
          "| command | wall min / median s | CPU median s | reference wall min / median s | reference CPU median s "
          "| wall median / reference | same output |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| `{r['command']}` | {r['min_s']:.2f} / {r['median_s']:.2f} | {r['cpu_median_s']:.2f} | "
                  + (f"{r['reference_min_s']:.2f} / {r['reference_median_s']:.2f} | {r['reference_cpu_median_s']:.2f} | "
                     f"{r['ratio_median']:.2f} | {'yes' if r['same_output'] else 'NO'} |" if "reference_min_s" in r
                     else "- | - | - | - |"))
    md += ["", "Heaviest top-level imports of one run (`python -X importtime`, cumulative s):", ""]
    for r in rows:
        md.append(f"- `{r['command']}`: " + ", ".join(f"{i['module']} {i['cumulative_s']:.2f}" for i in r["imports"]))
    write(args.tag, {"rows": rows}, md, "Interactive commands: process start to answer")


if __name__ == "__main__":
    main()
