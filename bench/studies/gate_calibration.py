"""Gate calibration: real refreshes on clean and corrupted copies of a catalogue, against a champion trained on
the clean data, and which gates block each one. Clean variations must pass (zero false blocks across seeds);
each corruption should be blocked, and the observed values show how far each sits from its threshold.

Conditions (each derived from the same clean copy, so only the corruption differs):
  clean-4%-flips      4% of labels flipped (a legitimate change: every stage retrains)
  clean-resample      a different random 90% of the events
  label-shuffle       labels permuted across events: label rate, volume and popularity unchanged
  swapped-item-ids    item ids permuted in the events: every marginal unchanged, item-label relation broken
  broken-join         each event joined to the next item id (an off-by-one key): marginals nearly unchanged
  duplicated-days     the last 10% of days replayed one day later (an ETL that ran twice)
  flipped-30%         30% of labels flipped (the label rate moves)
  next-window         a real rolling refresh: its own champion trained on the first 90% of the days, the
                      challenger on all of them (legitimate: must pass)

  python bench/studies/gate_calibration.py --data ../shared/data/movielens-100k --items 600 --seeds 0 1
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
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results"
FAST = {"SEMALIGN_ENCODER_EPOCHS": "2", "SEMALIGN_RANKER_EPOCHS": "2", "SEMALIGN_HIST_LEN": "20"}


def shop(ml: Path, dest: Path, n_items: int) -> Path:
    from semalign.data import load_dataset

    ds = load_dataset(ml)
    items = ds.items.iloc[:n_items]
    inter = ds.interactions[ds.interactions["item_id"].isin(set(items["item_id"]))]
    dest.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": "sku-" + items["item_id"], "text": items["text"]}).to_csv(dest / "items.csv", index=False)
    pd.DataFrame({"user_id": "u" + inter["user_id"], "item_id": "sku-" + inter["item_id"],
                  "timestamp": inter["ts"], "label": inter["label"]}).to_csv(dest / "interactions.csv", index=False)
    return dest


def corrupt(src: Path, dest: Path, kind: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "items.csv").write_bytes((src / "items.csv").read_bytes())
    ev = pd.read_csv(src / "interactions.csv", dtype={"user_id": str, "item_id": str})
    if kind == "clean-4%-flips":
        idx = rng.choice(len(ev), int(0.04 * len(ev)), replace=False)
        ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
    elif kind == "flipped-30%":
        idx = rng.choice(len(ev), int(0.30 * len(ev)), replace=False)
        ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
    elif kind == "clean-resample":
        ev = ev.iloc[np.sort(rng.choice(len(ev), int(0.9 * len(ev)), replace=False))]
    elif kind == "label-shuffle":
        ev["label"] = rng.permutation(ev["label"].to_numpy())
    elif kind == "swapped-item-ids":
        ids = ev["item_id"].unique()
        ev["item_id"] = ev["item_id"].map(dict(zip(ids, rng.permutation(ids))))
    elif kind == "broken-join":
        ids = sorted(ev["item_id"].unique())
        ev["item_id"] = ev["item_id"].map(dict(zip(ids, ids[1:] + ids[:1])))
    elif kind == "duplicated-days":
        cut = ev["timestamp"].quantile(0.9)
        replay = ev[ev["timestamp"] >= cut].assign(timestamp=lambda d: d["timestamp"] + 86_400)
        ev = pd.concat([ev, replay]).drop_duplicates(["user_id", "item_id", "timestamp"])
    else:
        raise ValueError(kind)
    ev.to_csv(dest / "interactions.csv", index=False)
    return dest


def earlier_days(src: Path, dest: Path, share: float) -> Path:
    """The catalogue as it was before its last days: events up to the `share` quantile of time."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "items.csv").write_bytes((src / "items.csv").read_bytes())
    ev = pd.read_csv(src / "interactions.csv", dtype={"user_id": str, "item_id": str})
    ev[ev["timestamp"] <= ev["timestamp"].quantile(share)].to_csv(dest / "interactions.csv", index=False)
    return dest


def refresh(data: Path, home: Path, seed: int) -> dict:
    env = {**os.environ, **FAST, "SEMALIGN_HOME": str(home), "SEMALIGN_SEED": str(seed)}
    p = subprocess.run([sys.executable, "-m", "semalign.cli", "run", "--data", str(data), "--json"], env=env,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode not in (0, 3):
        return {"error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout)


CONDITIONS = ["clean-4%-flips", "clean-resample", "label-shuffle", "swapped-item-ids", "broken-join",
              "duplicated-days", "flipped-30%", "next-window"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "movielens-100k")
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--conditions", nargs="+", default=CONDITIONS)
    ap.add_argument("--merge", action="store_true",
                    help="keep the other conditions' rows of the existing results (rerun only some)")
    args = ap.parse_args()
    rows, t0 = [], time.perf_counter()
    kept, commands = [], []
    if args.merge and (OUT / "gate_calibration.json").exists():
        old = json.loads((OUT / "gate_calibration.json").read_text())
        kept = [r for r in old["rows"] if not (r["condition"] in args.conditions and r["seed"] in args.seeds)]
        commands = [old["command"]] + old.get("merged", [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = shop(args.data, tmp / "clean", args.items)
        for seed in args.seeds:
            base = tmp / f"home-{seed}"
            first = refresh(clean, base, seed)  # the champion, on the clean data; each condition gets a copy
            if "error" in first or not first.get("promoted"):
                rows.append({"seed": seed, "condition": "champion", "error": str(first.get("error"))})
                continue
            for kind in args.conditions:
                home = tmp / f"home-{seed}-{kind}"
                if kind == "next-window":  # its own champion, on the earlier days only
                    own = refresh(earlier_days(clean, tmp / f"earlier-{seed}", 0.9), home, seed)
                    if "error" in own or not own.get("promoted"):
                        rows.append({"seed": seed, "condition": kind, "error": f"champion: {own.get('error')}"})
                        continue
                    res = refresh(clean, home, seed)
                else:
                    shutil.copytree(base, home)
                    res = refresh(corrupt(clean, tmp / f"{kind}-{seed}", kind, seed + 100), home, seed)
                if "error" in res:
                    rows.append({"seed": seed, "condition": kind, "blocked": True, "by": ["error: " + res["error"]]})
                    continue
                checks = [dict(c, gate=g["gate"]) for g in res["verdict"]["gates"] for c in g["checks"]]
                rows.append({"seed": seed, "condition": kind, "blocked": not res["verdict"]["passed"],
                             "by": [f"{c['gate']}: {c['name']}" for c in checks if not c["passed"]],
                             "checks": checks})
                print(json.dumps({k: rows[-1][k] for k in ("seed", "condition", "blocked", "by")}), flush=True)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows = sorted(kept + rows, key=lambda r: (r["seed"], order.get(r["condition"], -1)))
    # the command as anyone can rerun it: paths relative to the repository, not this machine's
    argv = [os.path.relpath(a, ROOT) if os.path.isabs(a) and os.path.exists(a) else a for a in sys.argv[1:]]
    this = "python bench/studies/gate_calibration.py " + " ".join(argv)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "command": commands[0] if commands else this, "merged": commands[1:] + [this] if commands else [],
           "wall_s": time.perf_counter() - t0, "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gate_calibration.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    md = ["# Gate calibration: clean vs corrupted refreshes", "",
          f"Machine: {res['machine']}. Command: `{res['command']}`. {args.items} MovieLens items as a generic "
          f"catalogue, champion trained on the clean copy with the same seed; wall {res['wall_s'] / 60:.0f} min.", "",
          "| condition | seed | blocked | by | closest observed values (check: observed vs expected) |",
          "|---|---|---|---|---|"]
    if res["merged"]:
        md.insert(3, "Rerun and merged in: " + "; ".join(f"`{c}`" for c in res["merged"]) + ".\n")
    watch = ("label rate", "label rate by item quartile", "label rate by user quartile", "repeated user-item pairs",
             "events the champion never trained on",
             "champion AUC all on the new window", "AUC all", "AUC unseen", "item popularity (KL)", "volume")
    for r in rows:
        obs = "; ".join(f"{c['name']}: {c['observed']:.3f} ({c['expected']})" for c in r.get("checks", [])
                        if c["name"] in watch and isinstance(c.get("observed"), (int, float)))
        md.append(f"| {r['condition']} | {r['seed']} | {'**yes**' if r.get('blocked') else 'no'} | "
                  f"{', '.join(r.get('by', [])) or r.get('error', '')} | {obs} |")
    (OUT / "gate_calibration.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
