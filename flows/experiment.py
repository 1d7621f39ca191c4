"""`semalign experiment`: the cold-start comparison of design section 2.

Per seed: seeded split -> behavior pairs + encoder (training window only) -> codebook -> every ranker
variant trained with the same loop and budget -> test predictions. Then AUC / GAUC / LogLoss per item
bucket (mean +- std over seeds) and the deltas of `full` against every baseline with 95% paired
bootstrap intervals (users resampled, same resample for both models).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from semalign.config import Settings
from semalign.data import BUCKETS, Dataset, Split, item_buckets, make_split, user_histories
from semalign.progress import Reporter

from .semantic_ids import TowerFeatures, codebook_stage, encoder_stage, ingest, tower_features

METRICS = ("auc", "gauc", "logloss")
ALL_BUCKETS = ("all",) + BUCKETS
DEFAULT_MODELS = ("full", "id_only", "content", "aligned_content", "sid_ngram", "logreg")


def generic_content(feats: TowerFeatures, image_dims: int = 64) -> np.ndarray:
    """The frozen generic content embedding: text tower output (+ a PCA of image features where present)."""
    parts = [feats.text]
    if feats.image is not None and feats.has_image.sum() > image_dims:
        img = feats.image[feats.has_image]
        mean = img.mean(0)
        _, _, vt = np.linalg.svd(img - mean, full_matrices=False)
        red = (feats.image - mean) @ vt[:image_dims].T
        red /= np.linalg.norm(red[feats.has_image], axis=1).mean() + 1e-9
        parts.append(red * feats.has_image[:, None])
    return np.concatenate(parts, 1).astype(np.float32)


def user_features(split: Split, n_users: int) -> np.ndarray:
    """Per user, from the training window only: smoothed positive rate, log event count."""
    tr = split.part("train")
    n = np.bincount(tr["user_idx"], minlength=n_users).astype(np.float64)
    pos = np.bincount(tr["user_idx"], weights=tr["label"], minlength=n_users)
    prior = tr["label"].mean()
    rate = (pos + 5 * prior) / (n + 5)
    return np.stack([rate - prior, np.log1p(n) / 5.0], 1).astype(np.float32)


def build_frames(split: Split, ufeat: np.ndarray, hist_len: int):
    from semalign.models.ranker import Frame

    train = split.part("train")
    frames = {}
    for name in ("train", "val", "test"):
        ev = split.part(name)
        hist, _ = user_histories(ev, train, hist_len)
        frames[name] = Frame(user_feats=ufeat[ev["user_idx"].to_numpy()], cand=ev["item_idx"].to_numpy() + 1,
                             hist=hist, label=ev["label"].to_numpy().astype(np.float32))
    return frames


def item_tables(ds: Dataset, split: Split, aligned: np.ndarray, raw: np.ndarray, codes: np.ndarray, n_codes: int):
    from semalign.models.ranker import ItemTables

    vocab = np.zeros(ds.n_items + 1, dtype=np.int64)
    seen = split.train_items
    vocab[seen + 1] = np.arange(1, len(seen) + 1)  # unseen items -> 0, the shared OOV row

    def pad(x):
        return np.concatenate([np.zeros((1, x.shape[1]), x.dtype), x])

    return ItemTables(id_vocab=vocab, content=pad(aligned), raw=pad(raw), codes=pad(codes), n_codes=n_codes)


def _aggregate(records: list[dict]) -> list[dict]:
    df = pd.DataFrame(records)
    out = []
    for (model, bucket, metric), g in df.groupby(["model", "bucket", "metric"], sort=False):
        out.append({"model": model, "bucket": bucket, "metric": metric, "mean": float(g["value"].mean()),
                    "std": float(g["value"].std(ddof=1)) if len(g) > 1 else 0.0,
                    "n_events": int(g["n_events"].mean())})
    return out


def markdown_table(results: list[dict], models: list[str], metric: str) -> str:
    by = {(r["model"], r["bucket"]): r for r in results if r["metric"] == metric}
    lines = [f"| {metric.upper()} | " + " | ".join(ALL_BUCKETS) + " |", "|---" * (len(ALL_BUCKETS) + 1) + "|"]
    for m in models:
        cells = []
        for b in ALL_BUCKETS:
            r = by.get((m, b))
            scale = 100 if metric != "logloss" else 1
            cells.append("-" if r is None else f"{r['mean'] * scale:.2f} ± {r['std'] * scale:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = {b: by.get((models[0], b), {}).get("n_events", 0) for b in ALL_BUCKETS}
    lines.append("| test events | " + " | ".join(str(n[b]) for b in ALL_BUCKETS) + " |")
    return "\n".join(lines)


def markdown_deltas(deltas: list[dict], metric: str) -> str:
    rows = [d for d in deltas if d["metric"] == metric]
    lines = [f"| {metric.upper()} delta (pt) of {rows[0]['model'] if rows else 'full'} vs | " + " | ".join(ALL_BUCKETS) + " |",
             "|---" * (len(ALL_BUCKETS) + 1) + "|"]
    for base in dict.fromkeys(d["baseline"] for d in rows):
        cells = []
        for b in ALL_BUCKETS:
            d = next((x for x in rows if x["baseline"] == base and x["bucket"] == b), None)
            scale = 100 if metric != "logloss" else 1
            if d is None:
                cells.append("-")
            else:
                sig = "**" if (d["ci_low"] > 0 or d["ci_high"] < 0) else ""
                cells.append(f"{sig}{d['mean'] * scale:+.2f} [{d['ci_low'] * scale:+.2f}, {d['ci_high'] * scale:+.2f}]{sig}")
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_auc(results: list[dict], models: list[str], path: Path, metric: str = "auc") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [next((r for r in results if r["model"] == m and r["bucket"] == b and r["metric"] == metric), None)
                for b in ALL_BUCKETS]
        ax.bar(np.arange(len(ALL_BUCKETS)) + i * width, [100 * v["mean"] if v else 0 for v in vals], width,
               yerr=[100 * v["std"] if v else 0 for v in vals], label=m, capsize=2)
    ax.set_xticks(np.arange(len(ALL_BUCKETS)) + 0.4 - width / 2, ALL_BUCKETS)
    ax.set_ylabel(f"{metric.upper()} (x100)")
    lo = min(100 * r["mean"] for r in results if r["metric"] == metric)
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_title(f"{metric.upper()} per item bucket (training-window interactions), mean ± std over seeds")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(settings: Settings, data: str | Path | None = None, split_kind: str = "cold-items",
                   seeds: int = 5, models: list[str] | None = None, json_path: Path | None = None,
                   rank_overrides: dict | None = None, n_boot: int = 200, rep: Reporter | None = None) -> dict:
    from semalign.models.metrics import BootstrapFrame, metric_set, paired_bootstrap
    from semalign.models.ranker import RankerConfig, predict, train_ranker

    rep = rep or Reporter(quiet=True)
    models = list(models or DEFAULT_MODELS)
    device = settings.resolved_device()
    t0 = time.perf_counter()
    ds = ingest(settings, data)
    feats = tower_features(settings, ds, rep)
    raw = generic_content(feats)
    records, frames_by_bucket, fits = [], {b: [] for b in ALL_BUCKETS}, []
    hist_len = 50
    for seed in range(seeds):
        s = settings.model_copy(update={"seed": seed, "split": split_kind})
        split = make_split(ds, split_kind, seed, s.cold_item_share)
        enc = encoder_stage(s, ds, split, feats, rep)
        cb = codebook_stage(s, ds, split, enc, parent=None, rep=rep, move_latest=False)
        codes = cb.sids[[c for c in cb.sids.columns if c.startswith("sid_") and c != "sid_dedup"]].to_numpy()
        tables = item_tables(ds, split, enc.embeddings, raw, codes, int(codes.max()) + 1)
        frames = build_frames(split, user_features(split, ds.n_users), hist_len)
        test = split.part("test")
        buckets = item_buckets(split.train_counts)[test["item_idx"].to_numpy()]
        users = test["user_idx"].to_numpy()
        y = frames["test"].label
        preds = {}
        with rep.stage(f"seed {seed}: rankers", len(models)) as adv:
            for m in models:
                cfg = RankerConfig(variant=m, seed=seed, **(rank_overrides or {}))
                res = train_ranker(cfg, tables, frames["train"], frames["val"], device)
                preds[m] = predict(res.model, frames["test"], device)
                fits.append({"seed": seed, "model": m, "best_epoch": res.best_epoch, "val_auc": res.best_val_auc,
                             "train_samples_per_s": res.samples_per_s})
                adv(1, **{m: f"val_auc={res.best_val_auc:.4f}"})
        for b in ALL_BUCKETS:
            sel = np.ones(len(y), bool) if b == "all" else buckets == b
            if sel.sum() == 0:
                continue
            for m in models:
                ms = metric_set(y[sel], preds[m][sel], users[sel])
                for k in METRICS:
                    records.append({"seed": seed, "model": m, "bucket": b, "metric": k, "value": ms[k],
                                    "n_events": ms["n_events"]})
            frames_by_bucket[b].append(BootstrapFrame(y[sel], users[sel], {m: preds[m][sel] for m in models}))
        rep.log(f"seed {seed}: encoder hit@30 {enc.metrics['hit@30']['encoder']:.4f} (raw text "
                f"{enc.metrics['hit@30']['raw_text']:.4f}); codebook {cb.version}")
    results = _aggregate(records)
    deltas = []
    if "full" in models:
        with rep.stage("paired bootstrap", len(models) - 1) as adv:
            for base in [m for m in models if m != "full"]:
                for b in ALL_BUCKETS:
                    if not frames_by_bucket[b]:
                        continue
                    ci = paired_bootstrap(frames_by_bucket[b], "full", base, n_boot=n_boot)
                    for k in METRICS:
                        mean, lo, hi = ci[k]
                        deltas.append({"model": "full", "baseline": base, "bucket": b, "metric": k, "mean": mean,
                                       "ci_low": lo, "ci_high": hi})
                adv(1)
    out = {"dataset": ds.name, "split": split_kind, "seeds": seeds, "models": models, "device": device,
           "rank_config": {k: v for k, v in (rank_overrides or {}).items()},
           "results": results, "deltas": deltas, "fits": fits, "per_seed": records,
           "wall_s": round(time.perf_counter() - t0, 1)}
    md = "\n\n".join([markdown_table(results, models, k) for k in METRICS] +
                     ([markdown_deltas(deltas, k) for k in ("gauc", "auc")] if deltas else []))
    out["markdown"] = md
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2, default=float))
        plot_auc(results, models, json_path.with_suffix(".auc.png"), "auc")
        plot_auc(results, models, json_path.with_suffix(".gauc.png"), "gauc")
        json_path.with_suffix(".md").write_text(md + "\n")
    return out
