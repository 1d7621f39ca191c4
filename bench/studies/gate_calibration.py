"""Gate calibration: real refreshes on clean and corrupted copies of a catalogue, against a champion trained on
the clean data, and which gates block each one. Clean variations must pass (zero false blocks across seeds);
each corruption should be blocked, and each check's margin (how far it sat from its threshold) shows how close
the call was.

Conditions (each derived from the same clean copy, so only the corruption differs):
  clean-4%-flips      4% of labels flipped (a legitimate change: every stage retrains)
  clean-resample      a different random 90% of the events
  next-window         a real rolling refresh: its own champion trained on the first 90% of the days, the
                      challenger on all of them (legitimate: must pass)
  user-shuffle        the broken user join: user ids permuted across events (label rate, volume, item popularity
                      and every user's activity unchanged; no user's history is theirs any more)
  user-remap          user ids mapped to other users (a wrong key table): each history intact but someone else's
  text-swap           item texts permuted between items (a wrong join of the item table)
  ts-shuffle          timestamps permuted within each user (the order of each user's events lost)
  label-shuffle       labels permuted across events: label rate, volume and popularity unchanged
  swapped-item-ids    item ids permuted in the events: every marginal unchanged, item-label relation broken
  broken-join         each event joined to the next item id (an off-by-one key): marginals nearly unchanged
  duplicated-days     the last 10% of days replayed one day later (an ETL that ran twice)
  flipped-30%         30% of labels flipped (the label rate moves)

Each refresh is `run_refresh` (what `semalign run` calls) in this one process, each in its own SEMALIGN_HOME;
the champion's home is copied for every condition of its seed.

  python bench/studies/gate_calibration.py --data movielens=../shared/data/movielens-100k:400 --seeds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results"
FAST = {"encoder_epochs": 2, "ranker_epochs": 2, "hist_len": 20}
CLEAN = ["clean-4%-flips", "clean-resample", "next-window"]
CONDITIONS = CLEAN + ["user-shuffle", "user-remap", "text-swap", "ts-shuffle", "label-shuffle", "swapped-item-ids",
                      "broken-join", "duplicated-days", "flipped-30%"]


def shop(source: Path, dest: Path, n_items: int) -> Path:
    """The first `n_items` items of a catalogue and their events, as a generic folder with its own id scheme."""
    from semalign.data import load_dataset

    ds = load_dataset(source)
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
    items = pd.read_csv(src / "items.csv", dtype={"item_id": str})
    ev = pd.read_csv(src / "interactions.csv", dtype={"user_id": str, "item_id": str})
    if kind == "clean-4%-flips":
        idx = rng.choice(len(ev), int(0.04 * len(ev)), replace=False)
        ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
    elif kind == "flipped-30%":
        idx = rng.choice(len(ev), int(0.30 * len(ev)), replace=False)
        ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
    elif kind == "clean-resample":
        ev = ev.iloc[np.sort(rng.choice(len(ev), int(0.9 * len(ev)), replace=False))]
    elif kind == "user-shuffle":
        ev["user_id"] = rng.permutation(ev["user_id"].to_numpy())
    elif kind == "user-remap":
        ids = ev["user_id"].unique()
        ev["user_id"] = ev["user_id"].map(dict(zip(ids, rng.permutation(ids))))
    elif kind == "text-swap":
        items["text"] = rng.permutation(items["text"].to_numpy())
    elif kind == "ts-shuffle":
        ev["timestamp"] = ev.groupby("user_id")["timestamp"].transform(lambda t: rng.permutation(t.to_numpy()))
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
    items.to_csv(dest / "items.csv", index=False)
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
    from semalign.config import Settings
    from semalign.errors import SemalignError
    from semalign.flows.refresh import run_refresh

    t0 = time.perf_counter()
    try:
        out = run_refresh(Settings(home=home, seed=seed, **FAST), data)
    except SemalignError as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "wall_s": time.perf_counter() - t0}
    return {**out, "wall_s": time.perf_counter() - t0}


def row_of(name: str, seed: int, kind: str, res: dict) -> dict:
    if "error" in res:  # refused at ingest: blocked by the input contract; anything else is a failed run, not a verdict
        refused = "stage 'ingest'" in res["error"] and "ValidationError" in res["error"]
        return {"dataset": name, "seed": seed, "condition": kind, **({"blocked": True} if refused else {}),
                "by": ["input contract: " + res["error"]] if refused else [], "error": None if refused else res["error"],
                "wall_s": res["wall_s"]}
    checks = [dict(c, gate=g["gate"]) for g in res["verdict"]["gates"] for c in g["checks"]]
    return {"dataset": name, "seed": seed, "condition": kind, "blocked": not res["verdict"]["passed"],
            "by": [f"{c['gate']}: {c['name']}" for c in checks if not c["passed"]], "checks": checks,
            "wall_s": res["wall_s"]}


def run_dataset(name: str, source: Path, n_items: int, seeds: list[int], conditions: list[str], tmp: Path,
                log, few_seeds: int | None = None) -> list[dict]:
    rows = []
    clean = shop(source, tmp / name / "clean", n_items)
    for seed in seeds:
        base = tmp / name / f"home-{seed}"
        first = refresh(clean, base, seed)  # the champion, on the clean data; each condition gets a copy
        if "error" in first or not first.get("promoted"):
            rows.append({"dataset": name, "seed": seed, "condition": "champion", "error": str(first.get("error"))})
            log(rows[-1])
            continue
        for kind in conditions:
            if few_seeds is not None and kind not in CLEAN + ["user-shuffle"] and seed not in seeds[:few_seeds]:
                continue
            home = tmp / name / f"home-{seed}-{kind}"
            if kind == "next-window":  # its own champion, on the earlier days only
                own = refresh(earlier_days(clean, tmp / name / f"earlier-{seed}", 0.9), home, seed)
                if "error" in own or not own.get("promoted"):
                    rows.append({"dataset": name, "seed": seed, "condition": kind,
                                 "error": f"champion: {own.get('error')}"})
                    log(rows[-1])
                    continue
                res = refresh(clean, home, seed)
            else:
                shutil.copytree(base, home)
                res = refresh(corrupt(clean, tmp / name / f"{kind}-{seed}", kind, seed + 100), home, seed)
            rows.append(row_of(name, seed, kind, res))
            log({k: rows[-1][k] for k in ("dataset", "seed", "condition", "blocked", "by", "wall_s")})
            shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- the report

def _fmt(v) -> str:
    return f"{v:+.3f}" if isinstance(v, float) else str(v)


def summary_rows(rows: list[dict]) -> list[str]:
    """One line per (dataset, condition): blocked n of N, by which checks, and the margins (observed minus
    threshold; negative = blocked) of the checks that decided, over seeds."""
    out = []
    keyed = {}
    for r in rows:
        if "checks" in r or r.get("blocked"):   # a verdict, or refused at ingest (failed runs are listed below)
            keyed.setdefault((r["dataset"], r["condition"]), []).append(r)
    for (ds, cond), rs in keyed.items():
        blocked = sum(bool(r.get("blocked")) for r in rs)
        by = sorted({b for r in rs for b in r.get("by", [])})
        margins = {}
        for r in rs:
            for c in r.get("checks", []):
                if "margin" in c:
                    margins.setdefault(f"{c['gate']}: {c['name']}", []).append(c["margin"])
        if cond in CLEAN:  # how close the closest seed came to a block, per check
            shown = "; ".join(f"{k} min {min(v):+.3f}" for k, v in margins.items())
        else:  # the blocking checks' margins (each seed), and the rest's closest
            shown = "; ".join(f"{k} {' / '.join(f'{m:+.3f}' for m in v)}" for k, v in margins.items()
                              if any(k in b for b in by) or min(v) < 0)
        kind = "legitimate" if cond in CLEAN else "corruption"
        out.append(f"| {ds} | {cond} ({kind}) | {blocked} of {len(rs)} | {', '.join(by) or '-'} | {shown or '-'} |")
    return out


def write(res: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gate_calibration.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    rows = res["rows"]
    clean_rows = [r for r in rows if r["condition"] in CLEAN and "checks" in r]
    md = ["# Gate calibration: clean vs corrupted refreshes", "",
          f"Machine: {res['machine']}. Command: `{res['command']}`"
          + "".join(f"; merged: `{c}`" for c in res.get("merged", [])) + ". Refreshes judged: "
          f"{sum(r.get('wall_s', 0) for r in rows) / 60:.0f} min of wall (the champions' refreshes not counted). "
          "Each dataset's first items as a generic catalogue; champion trained on the clean copy with the same seed; "
          f"refreshes with {FAST['encoder_epochs']} encoder and {FAST['ranker_epochs']} ranker epochs and "
          f"{FAST['hist_len']} history items. Clean conditions: "
          f"{sum(bool(r['blocked']) for r in clean_rows)} false blocks in {len(clean_rows)} refreshes.", "",
          "Margin = observed minus its threshold (quality: the upper end of the 95% paired interval of challenger "
          "- champion AUC, plus the margin); a negative margin blocks.", "",
          "| dataset | condition | blocked | by | margins (legitimate: closest over seeds; corruption: per seed) |",
          "|---|---|---|---|---|"] + summary_rows(rows)
    md += ["", "## Every refresh", "", "| dataset | condition | seed | blocked | by | quality interval (all) | "
           "pairs above chance | users recognised | champion GAUC / AUC |", "|---|---|---|---|---|---|---|---|---|"]

    def obs(r, name):
        c = next((c for c in r.get("checks", []) if c["name"].startswith(name)), None)
        if c is None:
            return ""
        if "interval" in c:
            return f"{c['observed']:+.4f} [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]"
        return f"{c['observed']:.3f}"

    for r in rows:
        md.append(f"| {r['dataset']} | {r['condition']} | {r['seed']} | {'**yes**' if r.get('blocked') else 'no'} | "
                  f"{', '.join(r.get('by', [])) or r.get('error', '')} | {obs(r, 'AUC all: challenger')} | "
                  f"{obs(r, 'behaviour pairs')} | {obs(r, 'users recognised')} | "
                  f"{obs(r, 'champion GAUC')} / {obs(r, 'champion AUC')} |")
    (OUT / "gate_calibration.md").write_text("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", default=[f"movielens={ROOT.parent / 'shared/data/movielens-100k'}:400"],
                    help="NAME=PATH:ITEMS, one per catalogue")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--conditions", nargs="+", default=CONDITIONS)
    ap.add_argument("--few-seeds", type=int, default=None,
                    help="corruptions other than the broken user join run on the first N seeds only (time)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of the existing results (rerun or add only some)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    kept, commands = [], []
    if args.merge and (OUT / "gate_calibration.json").exists():
        old = json.loads((OUT / "gate_calibration.json").read_text())
        names = [d.split("=")[0] for d in args.data]
        kept = [r for r in old["rows"] if not (r.get("dataset") in names and r["seed"] in args.seeds
                                               and r["condition"] in args.conditions + ["champion"])]
        commands = [old["command"]] + old.get("merged", [])
    # the command as anyone can rerun it: paths relative to the repository, not this machine's
    argv = [a.split("=")[0] + "=" + os.path.relpath(a.split("=", 1)[1], ROOT) if "=" in a and os.path.isabs(
        a.split("=", 1)[1].rsplit(":", 1)[0]) else a for a in sys.argv[1:]]
    this = "python bench/studies/gate_calibration.py " + " ".join(argv)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "command": commands[0] if commands else this, "merged": commands[1:] + [this] if commands else [],
           "wall_s": 0.0, "rows": list(kept)}

    def log(r):
        print(json.dumps(r, default=float), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # one Prefect home for every refresh of this process (the first refresh's home would be removed under it)
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        for spec in args.data:
            name, rest = spec.split("=", 1)
            path, n_items = rest.rsplit(":", 1)
            res["rows"] += run_dataset(name, Path(path), int(n_items), args.seeds, args.conditions, Path(tmp), log,
                                     args.few_seeds)
            res["wall_s"] = time.perf_counter() - t0
            write(res)   # after each catalogue: a long run keeps what it finished
    order = {c: i for i, c in enumerate(CONDITIONS)}
    res["rows"].sort(key=lambda r: (r.get("dataset", ""), order.get(r["condition"], -1), r["seed"]))
    res["wall_s"] = time.perf_counter() - t0
    write(res)


if __name__ == "__main__":
    main()
