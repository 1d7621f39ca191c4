"""`semalign experiment`: the cold-start comparison of design section 2.

Per seed: seeded split -> behavior pairs + encoder (training window only) -> codebook -> every ranker
variant trained with the same loop and budget -> test predictions. Then AUC / GAUC / LogLoss per item
bucket (mean +- std over seeds) and the deltas of the served variant (settings.ranker_variant) against every
other model with 95% paired bootstrap intervals (users resampled, same resample for both models).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from semalign.config import Settings
from semalign.data import ALL_BUCKETS, item_buckets
from semalign.errors import InvalidInputError, NotFoundError
from semalign.features import build_frames, user_features
from semalign.progress import Reporter
from semalign.spec import codebook_levers, id_budget, parse_model  # noqa: F401 (the experiment's model names)

from .semantic_ids import TowerFeatures, codebook_stage, load_codebook

METRICS = ("auc", "gauc", "logloss")
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
    lines = [f"| {metric.upper()} delta (pt) of {rows[0]['model'] if rows else 'served'} vs | " + " | ".join(ALL_BUCKETS) + " |",
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


def markdown_selection(fits: list[dict], models: list[str]) -> str:
    """The selection view: every model on the pseudo-cold validation items (never test items), mean over seeds.
    Levers and the served variant are chosen here, not on the test table."""
    lines = ["| validation (selection) | pseudo-cold GAUC | pseudo-cold AUC | all val AUC | best epochs |",
             "|---|---|---|---|---|"]
    for m in models:
        rows = [f for f in fits if f["model"] == m]
        if not rows:
            continue

        def mean(k):
            v = [r[k] for r in rows if r.get(k) is not None]
            return f"{100 * float(np.mean(v)):.2f}" if v else "-"
        lines.append(f"| {m} | {mean('val_cold_gauc')} | {mean('val_cold_auc')} | {mean('val_auc')} | "
                     f"{','.join(str(r['best_epoch']) for r in rows)} |")
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


def model_spec(settings: Settings, model: str, n_items: int, rank_overrides: dict | None = None):
    """(the specification the experiment trains `model` with under `settings` (its seed): the levers of its name
    over the run's options, a bounded table's budget in rows of this catalogue; the codebook size it names)."""
    from semalign.spec import specification

    variant, levers = parse_model(model)
    levers, size = codebook_levers(levers)
    spec = specification(settings, variant, settings.seed, model=model,
                         **{**id_budget(rank_overrides or {}, n_items), **id_budget(levers, n_items)})
    return spec, size


def run_experiment(settings: Settings, data: str | Path | None = None, split_kind: str = "cold-items",
                   seeds: int = 5, models: list[str] | None = None, json_path: Path | None = None,
                   rank_overrides: dict | None = None, n_boot: int = 200, rep: Reporter | None = None,
                   seed_start: int = 0) -> dict:
    """Seeds `seed_start .. seed_start + seeds - 1`. The served variant (`settings.ranker_variant`, built by
    `semalign.spec.specification` exactly as the refresh builds it) is compared against every other model.
    With `json_path`, per-event test predictions go to `<json>.preds.npz` so runs over disjoint seed ranges
    can be merged (`merge_experiments`) into one table with intervals over all seeds."""
    from semalign.flows.engines import compute_engine
    from semalign.flows.pipeline import upstream
    from semalign.flows.ranker_stages import ranker_tables
    from semalign.models.metrics import metric_set
    from semalign.models.ranker import SID_ROWS, predict
    from semalign.models.ranker_training import train_ranker
    from semalign.spec import served_model, upstream_settings

    rep = rep or Reporter(quiet=True)
    served = served_model(settings)
    models = list(models or DEFAULT_MODELS)
    device = settings.resolved_device()
    t0 = time.perf_counter()
    engine = compute_engine(settings)
    first = upstream(settings, data, rep, through="towers", engine=engine)   # embedded once for every seed
    ds, feats = first.ds, first.feats
    generic = generic_content(feats)  # the `content` / `logreg` baselines' input
    fits, saved = [], {}
    configs = {}
    for seed in range(seed_start, seed_start + seeds):
        s = settings.model_copy(update={"seed": seed, "split": split_kind})
        up = upstream(s, rep=rep, through="encoder", ds=ds, feats=feats, engine=engine)
        split, enc = up.split, up.enc
        codebooks, tables = {}, {}

        def codebook_for(size: dict):
            # the settings' codebook, or the size a model names (codebook_levels / codebook_codes): one per size a seed
            key = (size.get("levels") or s.codebook_levels, size.get("codes") or s.codebook_codes)
            if key not in codebooks:
                cb = codebook_stage(s, ds, split, enc, parent=None, levels=key[0], codes=key[1], rep=rep,
                                    move_latest=False)
                # its size sizes the tables, as in the refresh; sid decodes with its centroids
                codebooks[key] = (cb, load_codebook(s, cb.version))
            return key, codebooks[key]

        def tables_for(cfg, size: dict):
            # aligned variants read the served text-tower vector beside the aligned one (keep_raw_content); a
            # bounded ID table, a vector codec and a codebook size change the tables, so each distinct one is
            # built once a seed
            cb_key, (cb, codebook) = codebook_for(size)
            raw_name = "generic" if cfg.variant in ("content", "logreg") else "text" if cfg.reads_raw else None
            key = (raw_name, cfg.id_buckets if cfg.variant not in SID_ROWS else 0, cfg.content_codec, cb_key)
            if key not in tables:
                tables[key] = ranker_tables(ds, split, cb, codebook, feats, cfg, generic=generic)
            return tables[key]
        cb = codebook_for({})[1][0]
        frames = build_frames(split, user_features(split, ds.n_users), s.hist_len)
        test, val = split.part("test"), split.part("val")
        val_cold = val["item_idx"].isin(split.val_cold_items).to_numpy()
        preds = {}
        with rep.stage(f"seed {seed}: rankers", len(models)) as adv:
            for m in models:
                spec, size = model_spec(s, m, ds.n_items, rank_overrides)
                cfg = spec.ranker
                item = tables_for(cfg, size)
                configs[m] = {k: v for k, v in asdict(cfg).items() if k != "seed"}
                if size:  # the size the codebook got (codes sized to the catalogue where only levels were named)
                    cb_key, (_, codebook) = codebook_for(size)
                    configs[m]["codebook"] = {"levels": cb_key[0], "codes": int(codebook.codes)}
                res = train_ranker(cfg, item, frames["train"], frames["val"], device)
                preds[m] = predict(res.model, frames["test"], device)
                pv = predict(res.model, frames["val"], device)
                vc = metric_set(frames["val"].label[val_cold], pv[val_cold], val["user_idx"].to_numpy()[val_cold]) \
                    if val_cold.any() else {}
                fits.append({"seed": seed, "model": m, "best_epoch": res.best_epoch, "val_auc": res.best_val_auc,
                             "val_cold_auc": vc.get("auc"), "val_cold_gauc": vc.get("gauc"),
                             "train_samples_per_s": res.samples_per_s})
                adv(1, **{m: f"val_auc={res.best_val_auc:.4f}"})
        saved[seed] = {"y": frames["test"].label, "users": test["user_idx"].to_numpy(),
                       "buckets": item_buckets(split.train_counts)[test["item_idx"].to_numpy()].astype(str), "preds": preds}
        rep.log(f"seed {seed}: encoder hit@30 {enc.metrics['hit@30']['encoder']:.4f} (raw text "
                f"{enc.metrics['hit@30']['raw_text']:.4f}); codebook {cb.version}")
    upstream = upstream_settings(settings)
    out = {"dataset": ds.name, "split": split_kind, "seeds": list(saved), "models": models, "device": device,
           "served": served, "configs": configs,
           # the encoder and codebook every model's SIDs came from (seeds apart; a size a model names aside)
           "upstream": {part: {k: v for k, v in upstream[part].items() if k != "seed"} for part in upstream},
           "rank_config": {k: v for k, v in (rank_overrides or {}).items()}, "fits": fits,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out.update(summarise(saved, models, served, n_boot, rep))
    out["markdown"] += "\n\n" + markdown_selection(fits, models)
    if json_path is not None:
        write_results(out, saved, Path(json_path))
    return out


def summarise(saved: dict, models: list[str], served: str, n_boot: int = 200, rep: Reporter | None = None) -> dict:
    """Metrics per (seed, model, bucket), their mean +- std, and the served model's deltas against every other
    model with 95% paired bootstrap intervals (users resampled within each seed, same resample for both)."""
    from semalign.flows.ranker_stages import bucket_metrics
    from semalign.models.metrics import BootstrapFrame, paired_bootstrap

    rep = rep or Reporter(quiet=True)
    records, frames_by_bucket = [], {b: [] for b in ALL_BUCKETS}
    for seed, d in saved.items():
        y, users, buckets, preds = d["y"], d["users"], d["buckets"], d["preds"]
        per_model = {m: bucket_metrics(y, preds[m], users, buckets, both_classes=False) for m in models}
        for b in ALL_BUCKETS:
            sel = np.ones(len(y), bool) if b == "all" else buckets == b
            if sel.sum() == 0:
                continue
            for m in models:
                ms = per_model[m][b]
                for k in METRICS:
                    records.append({"seed": int(seed), "model": m, "bucket": b, "metric": k, "value": ms[k],
                                    "n_events": ms["n_events"]})
            frames_by_bucket[b].append(BootstrapFrame(y[sel], users[sel], {m: preds[m][sel] for m in models}))
    results = _aggregate(records)
    deltas = []
    if served in models:
        with rep.stage("paired bootstrap", len(models) - 1) as adv:
            for base in [m for m in models if m != served]:
                for b in ALL_BUCKETS:
                    if not frames_by_bucket[b]:
                        continue
                    ci = paired_bootstrap(frames_by_bucket[b], served, base, n_boot=n_boot)
                    for k in METRICS:
                        mean, lo, hi = ci[k]
                        deltas.append({"model": served, "baseline": base, "bucket": b, "metric": k, "mean": mean,
                                       "ci_low": lo, "ci_high": hi})
                adv(1)
    md = "\n\n".join([markdown_table(results, models, k) for k in METRICS] +
                      ([markdown_deltas(deltas, k) for k in ("gauc", "auc")] if deltas else []))
    return {"results": results, "deltas": deltas, "per_seed": records, "markdown": md}


def write_results(out: dict, saved: dict, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2, default=float))
    arrays = {}
    for seed, d in saved.items():
        for k in ("y", "users", "buckets"):
            arrays[f"{seed}/{k}"] = d[k]
        for m, p in d["preds"].items():
            arrays[f"{seed}/pred/{m}"] = p
    np.savez_compressed(json_path.with_suffix(".preds.npz"), **arrays)
    plot_auc(out["results"], out["models"], json_path.with_suffix(".auc.png"), "auc")
    plot_auc(out["results"], out["models"], json_path.with_suffix(".gauc.png"), "gauc")
    json_path.with_suffix(".md").write_text(out["markdown"] + "\n")


def load_saved(json_path: Path) -> tuple[dict, dict]:
    """(the run's JSON, its per-seed test predictions) from a result file written with `--json`."""
    json_path = Path(json_path)
    out = json.loads(json_path.read_text())
    npz = json_path.with_suffix(".preds.npz")
    if not npz.exists():
        raise NotFoundError(f"{npz}: the predictions of {json_path.name} are missing (written by --out)")
    saved = {}
    with np.load(npz, allow_pickle=False) as z:
        for key in z.files:
            seed, rest = key.split("/", 1)
            d = saved.setdefault(int(seed), {"preds": {}})
            if rest.startswith("pred/"):
                d["preds"][rest[5:]] = z[key]
            else:
                d[rest] = z[key]
    return out, saved


def merge_experiments(paths: list[Path], json_path: Path | None = None, n_boot: int = 200,
                      rep: Reporter | None = None, served: str | None = None) -> dict:
    """One table over several runs of the same dataset and split: disjoint seeds are concatenated, and runs of
    the same seed with other models (same test events, checked) add their models. `served` names the model the
    deltas are taken for (default: the runs' served variant)."""
    runs = [load_saved(p) for p in paths]
    first = runs[0][0]
    saved, fits, wall, configs, models = {}, [], 0.0, {}, []
    for (out, sv), p in zip(runs, paths):
        for key in ("dataset", "split", "served"):
            if out.get(key) != first.get(key):
                raise InvalidInputError(f"{p}: cannot merge, its {key} differs ({out.get(key)!r} vs {first.get(key)!r})")
        for m, c in out.get("configs", {}).items():
            if configs.setdefault(m, c) != c:
                raise InvalidInputError(f"{p}: cannot merge, model {m} was trained with another configuration")
        models += [m for m in out["models"] if m not in models]
        for seed, d in sv.items():
            if seed not in saved:
                saved[seed] = d
                continue
            have = saved[seed]
            if not (np.array_equal(have["y"], d["y"]) and np.array_equal(have["users"], d["users"])):
                raise InvalidInputError(f"{p}: seed {seed} has other test events than another file")
            dup = set(have["preds"]) & set(d["preds"])
            if dup:
                raise InvalidInputError(f"{p}: seed {seed} of models {sorted(dup)} is already in another file")
            have["preds"].update(d["preds"])
        fits += out.get("fits", [])
        wall += float(out.get("wall_s", 0.0))
    incomplete = {seed: sorted(set(models) - set(d["preds"])) for seed, d in saved.items() if set(models) - set(d["preds"])}
    if incomplete:
        raise InvalidInputError(f"cannot merge: seeds miss models {incomplete}")
    served = served or first["served"]
    merged = {**{k: first.get(k) for k in ("dataset", "split", "device", "rank_config")}, "served": served,
              "models": models, "configs": configs, "seeds": sorted(saved), "fits": fits, "wall_s": round(wall, 1),
              "merged_from": [Path(p).name for p in paths]}
    merged.update(summarise(dict(sorted(saved.items())), models, served, n_boot, rep))
    merged["markdown"] += "\n\n" + markdown_selection(fits, models)
    if json_path is not None:
        write_results(merged, dict(sorted(saved.items())), Path(json_path))
    return merged
