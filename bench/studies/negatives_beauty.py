"""Does the in-product negative sampler reproduce amazon-beauty's shipped negatives?

amazon-beauty ships one sampled negative per review (its README: same user and timestamp, an item the user never
reviewed, drawn uniformly from the items whose first review is at or before that timestamp). This drops them, loads
the reviews alone as an implicit log (semalign samples the negatives, uniform and popularity-weighted) and compares
the statistics: negatives per positive, time matching, per (user, day) counts, item availability at the draw, how
popular and how old the drawn items are, and how often a negative is an item the user reviews later (the shipped
rule excludes those using the future; semalign's draws use nothing after their own time).

  python bench/studies/negatives_beauty.py --data ../shared/data/amazon-beauty
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402


def stats(inter: pd.DataFrame) -> dict:
    pos, neg = inter[inter["label"] == 1], inter[inter["label"] == 0]
    first = pos.groupby("item_id")["ts"].min()
    total = pos.groupby("item_id").size()
    groups_pos = pos.groupby(["user_id", "ts"]).size()
    groups_neg = neg.groupby(["user_id", "ts"]).size().reindex(groups_pos.index, fill_value=0)
    engaged = pos.groupby(["user_id", "item_id"])["ts"].min()
    later = engaged.reindex(pd.MultiIndex.from_arrays([neg["user_id"], neg["item_id"]])).to_numpy()
    age_days = (neg["ts"].to_numpy() - first.reindex(neg["item_id"]).to_numpy()) / 86_400
    pop = total.reindex(neg["item_id"]).to_numpy()
    return {"positives": len(pos), "negatives": len(neg), "negatives_per_positive": len(neg) / len(pos),
            "time_matched": float(np.mean([k in groups_pos.index for k in zip(neg["user_id"], neg["ts"])])),
            "user_days_with_as_many_negatives_as_positives": float((groups_neg == groups_pos).mean()),
            "available_at_draw": float(np.mean(age_days >= 0)),
            "user_engages_later": float(np.mean(later > neg["ts"].to_numpy())),
            "user_engaged_before": float(np.mean(later <= neg["ts"].to_numpy())),
            "item_age_days_median": float(np.median(age_days)),
            "item_reviews_median": float(np.median(pop)), "item_reviews_mean": float(np.mean(pop)),
            "distinct_negative_items": int(neg["item_id"].nunique())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(harness.ROOT.parent / "shared" / "data" / "amazon-beauty"))
    ap.add_argument("--tag", default="negatives_beauty")
    args = ap.parse_args()
    from semalign.data import load_dataset
    from semalign.negatives import NegativeSampling

    shipped = load_dataset(args.data)
    out = {"shipped": stats(shipped.interactions)}
    with tempfile.TemporaryDirectory() as tmp:
        items = pd.read_csv(Path(args.data) / "items.csv", dtype=str, keep_default_na=False)
        events = pd.read_csv(Path(args.data) / "interactions.csv", dtype=str, keep_default_na=False)
        items.to_csv(Path(tmp) / "items.csv", index=False)
        events[events["label"] == "1"].drop(columns="label").to_csv(Path(tmp) / "interactions.csv", index=False)
        for w in ("uniform", "popularity"):
            ds = load_dataset(tmp, negatives=NegativeSampling(1, w, 0))
            out[f"semalign {w}"] = {**stats(ds.interactions), "short": ds.report["negatives"]["short"]}
            mine = ds.interactions[ds.interactions["label"] == 0][["user_id", "item_id", "ts"]]
            theirs = shipped.interactions[shipped.interactions["label"] == 0][["user_id", "item_id", "ts"]]
            out[f"semalign {w}"]["same_negative_as_shipped"] = len(mine.merge(theirs)) / len(theirs)
    keys = list(out["shipped"])
    md = ["| statistic | shipped file | " + " | ".join(k for k in out if k != "shipped") + " |",
          "|---|" + "---|" * len(out)]
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    md += [f"| {k} | " + " | ".join(fmt(out[c][k]) for c in out) + " |" for k in keys]
    md += ["| same (user, item, timestamp) as a shipped negative | - | " +
           " | ".join(fmt(out[c]["same_negative_as_shipped"]) for c in out if c != "shipped") + " |"]
    md += ["", "Shipped rule: an item the user *never* reviews (uses the future), uniform over items first reviewed at "
               "or before the timestamp. semalign: an item the user has not reviewed *up to* that time, same pool; the "
               "4 positives of the first user in 2002 have no such item (the shipped file widened its pool to later "
               "items for them; semalign leaves them short)."]
    harness.write(args.tag, {"data": args.data, "results": out}, md,
                  "In-product negatives vs amazon-beauty's shipped negatives")


if __name__ == "__main__":
    main()
