"""Quality of the encoder and codebooks on a real dataset (default: MovieLens-100K, cold-items split, seed 0).

Reports: encoder Hit@30 vs raw text / raw image features; RQ-KMeans vs RQ-VAE utilisation, collision rate
before/after dedup, reconstruction error; SID churn when 10% of the interactions change (labels flipped),
the encoder is retrained and the codebook rebuilt with the parent (warm start + Hungarian matching)
versus without it. Writes bench/results/codebook_quality_<dataset>.json|.md.

  python bench/studies/codebook_quality.py [--data PATH] [--home DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def churn(a, b) -> float:
    cols = [c for c in a.columns if c.startswith("sid_") and c != "sid_dedup"]
    a, b = a.set_index("item_id")[cols], b.set_index("item_id").loc[a["item_id"], cols]
    return float((a.to_numpy() != b.to_numpy()).any(1).mean())


def main():
    from semalign.config import get_settings
    from semalign.data import Dataset, settings_split
    from semalign.flows.semantic_ids import codebook_stage, encoder_stage, ingest, tower_features
    from semalign.progress import Reporter

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "movielens-100k"))
    ap.add_argument("--home", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    s = get_settings(home=args.home, data=args.data)
    t0 = time.perf_counter()
    res = {"command": "python " + " ".join(["bench/studies/codebook_quality.py"] + sys.argv[1:]), "split": s.split, "seed": s.seed}
    with Reporter() as rep:
        ds = ingest(s)
        split = settings_split(ds, s)
        feats = tower_features(s, ds, rep)
        enc = encoder_stage(s, ds, split, feats, rep)
        res["dataset"] = ds.name
        res["encoder"] = enc.metrics
        km = codebook_stage(s, ds, split, enc, parent=None, rep=rep, move_latest=False)
        vae = codebook_stage(s.model_copy(update={"codebook_method": "rqvae"}), ds, split, enc, parent=None, rep=rep,
                             move_latest=False)
        keep = ("utilisation", "perplexity", "collision_rate", "catalogue_collision_rate",
                "catalogue_collision_rate_after_dedup", "max_dedup", "relative_recon_error")
        res["codebooks"] = {"rqkmeans": {"version": km.version, **{k: km.metrics[k] for k in keep}},
                            "rqvae": {"version": vae.version, **{k: vae.metrics[k] for k in keep}}}
        # 10% of the interactions change; everything downstream is retrained
        rng = np.random.default_rng(0)
        inter = ds.interactions.copy()
        flip = rng.random(len(inter)) < 0.10
        inter.loc[flip, "label"] = (1 - inter.loc[flip, "label"]).astype("int8")
        ds2 = Dataset(name=ds.name, items=ds.items, interactions=inter, report=ds.report)
        split2 = settings_split(ds2, s)
        enc_scratch = encoder_stage(s, ds2, split2, feats, rep)                   # retrained from scratch
        enc_warm = encoder_stage(s, ds2, split2, feats, rep, parent=enc.version)  # fine-tuned from its parent
        rows = {}
        for method, parent in (("rqkmeans", km), ("rqvae", vae)):
            sm = s.model_copy(update={"codebook_method": method})
            chain = codebook_stage(sm, ds2, split2, enc_warm, parent=parent.version, rep=rep, move_latest=False)
            cb_only = codebook_stage(sm, ds2, split2, enc_scratch, parent=parent.version, rep=rep, move_latest=False)
            fresh = codebook_stage(sm, ds2, split2, enc_scratch, parent=None, rep=rep, move_latest=False)
            rows[method] = {"with_parent": churn(parent.sids, chain.sids),
                            "with_parent_per_level": chain.churn["per_level"] if chain.churn else None,
                            "codebook_parent_only": churn(parent.sids, cb_only.sids),
                            "without_parent": churn(parent.sids, fresh.sids)}
        res["churn_after_10pct_change"] = rows
        res["encoder_after_change_hit@30"] = {"from_parent": enc_warm.metrics["hit@30"]["encoder"],
                                              "from_scratch": enc_scratch.metrics["hit@30"]["encoder"]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    h = res["encoder"]["hit@30"]
    md = [f"# codebook quality: {res['dataset']}, {res['split']} split, seed {res['seed']}", "",
          f"command: `{res['command']}`", "",
          "| Hit@30 on held-out (test-window) pairs | all pairs | pairs with a cold item | pairs with two images |",
          "|---|---|---|---|",
          f"| behavior-aware encoder | {h['encoder']:.4f} | {h['encoder_cold_pairs']:.4f} | {h.get('encoder_image_pairs', float('nan')):.4f} |",
          f"| raw MiniLM text | {h['raw_text']:.4f} | {h['raw_text_cold_pairs']:.4f} | {h.get('raw_text_image_pairs', float('nan')):.4f} |",
          f"| raw EfficientNet image | - | - | {h.get('raw_image_image_pairs', float('nan')):.4f} |", "",
          "| codebook | utilisation per level | collision rate (fit items) | collision rate (catalogue) before -> after dedup | max dedup | relative recon error |",
          "|---|---|---|---|---|---|"]
    for m, c in res["codebooks"].items():
        md.append(f"| {m} | {', '.join(f'{u:.2f}' for u in c['utilisation'])} | {c['collision_rate']:.3f} | "
                  f"{c['catalogue_collision_rate']:.3f} -> {c['catalogue_collision_rate_after_dedup']:.3f} | {c['max_dedup']} | "
                  f"{c['relative_recon_error']:.3f} |")
    md += ["", "| SID churn after 10% of interactions change | encoder fine-tuned from parent + codebook from parent | "
           "encoder from scratch + codebook from parent | no parents |", "|---|---|---|---|"]
    for m, c in rows.items():
        md.append(f"| {m} | {c['with_parent']:.3f} (per level {', '.join(f'{x:.2f}' for x in c['with_parent_per_level'])}) | "
                  f"{c['codebook_parent_only']:.3f} | {c['without_parent']:.3f} |")
    h2 = res["encoder_after_change_hit@30"]
    md.append(f"\nEncoder Hit@30 after the change: {h2['from_parent']:.4f} fine-tuned from parent, {h2['from_scratch']:.4f} from scratch.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"codebook_quality_{res['dataset']}.json").write_text(json.dumps(res, indent=2, default=float))
    (out / f"codebook_quality_{res['dataset']}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
