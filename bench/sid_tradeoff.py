"""The table users ask for: ranker quality against the bytes per item it reads at serving and against items per ID
row, from `semalign experiment` results (no training here), with a plot of GAUC (all, unseen) against bytes per item
on a log axis.

Bytes per item are the values the model reads per item at serving (`flows.ranker_stages.served_bytes_per_item`:
codes at 1 byte for <= 256 codes a level + the dedup level, vectors as float32 or their codec); the online store's
own overhead per row is measured by bench/studies/bench_profile_bytes.py.

  python bench/sid_tradeoff.py RESULT.json:N_ITEMS [...] [--tag sid_tradeoff]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import RESULTS as OUT
from harness import write
ALIGNED, RAW, LEVELS = 128, 384, 3


def model_rows(result: dict, n_items: int) -> list[dict]:
    from semalign.flows.ranker_stages import served_bytes_per_item
    from semalign.models.ranker import RankerConfig

    by = {(r["model"], r["bucket"], r["metric"]): r for r in result["results"]}
    rows = []
    for m in result["models"]:
        c = dict(result["configs"][m])
        c["hidden"] = tuple(c["hidden"])
        cfg = RankerConfig(**c)
        nbytes = served_bytes_per_item(cfg, LEVELS, 256, ALIGNED, RAW, 255)
        buckets = cfg.id_buckets or None
        row = {"model": m, "bytes_per_item": nbytes,
               "items_per_row": round(n_items / buckets, 1) if buckets else 1.0,
               "exact_ids": not buckets}
        for b in ("all", "unseen", "1-9"):
            for k in ("gauc", "auc"):
                r = by.get((m, b, k))
                row[f"{k}_{b}"] = None if r is None else 100 * r["mean"]
                row[f"{k}_{b}_std"] = None if r is None else 100 * r["std"]
        rows.append(row)
    return rows


def plot(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        ten = [r for r in rows if r["exact_ids"] or abs(r["items_per_row"] - 10) < 1]
        for key, marker in (("gauc_all", "o"), ("gauc_unseen", "s")):
            for r in ten:
                if r[key] is None:
                    continue
                x = max(r["bytes_per_item"], 0.5)  # hashed IDs read no item bytes: drawn at 0.5
                ax.scatter(x, r[key], marker=marker, color="C0" if key == "gauc_all" else "C3")
                ax.annotate(r["model"].replace("@content_codec=", " ").replace("+keep_raw_content=false", "")
                            .replace("@id_buckets=0", " (1 row/item)"), (x, r[key]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per item read at serving (log; hashed IDs at 0.5)")
        ax.set_ylabel("GAUC x100 (circles: all, squares: unseen)")
        ax.set_title(f"{name}: 10 items per ID row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="RESULT.json:N_ITEMS (catalogue items, for items per row)")
    ap.add_argument("--tag", default="sid_tradeoff")
    args = ap.parse_args()
    tables, md = {}, []
    for spec in args.results:
        path, _, n = spec.rpartition(":")
        res = json.loads(Path(path).read_text())
        rows = model_rows(res, int(n))
        name = f"{res['dataset']} ({len(res['seeds'])} seed{'s' * (len(res['seeds']) > 1)})"
        tables[name] = rows
        md += [f"### {name}", "", "| model | bytes / item | items / ID row | GAUC all | GAUC unseen | GAUC 1-9 | "
               "AUC unseen |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["items_per_row"], r["bytes_per_item"])):
            def cell(k):
                return "-" if r[k] is None else f"{r[k]:.2f} ± {r[k + '_std']:.2f}"
            md.append(f"| {r['model']} | {r['bytes_per_item']} | "
                      f"{'1 (exact)' if r['exact_ids'] else r['items_per_row']} | {cell('gauc_all')} | "
                      f"{cell('gauc_unseen')} | {cell('gauc_1-9')} | {cell('auc_unseen')} |")
        md.append("")
    write(args.tag, {"tables": tables}, md, "Ranker quality against bytes per item and items per ID row")
    plot(tables, OUT / f"{args.tag}.png")


if __name__ == "__main__":
    main()
