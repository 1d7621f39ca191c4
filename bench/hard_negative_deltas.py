"""Paired deltas between two `semalign experiment` runs over the same seeds and splits but different encoder
settings (which `--merge` cannot join: both runs hold a model named `aligned_content`).

    python bench/hard_negative_deltas.py --base RUN_A --lever RUN_B --label "share 0.5" [--bucket unseen]

RUN_A / RUN_B are result-file prefixes written by `bench/device_experiment.sh` (RUN.s0.json, RUN.s1.json, ...,
each with its .preds.npz). Every model of RUN_B is compared with `aligned_content` of RUN_A on the same test
events (asserted), with a 95% paired bootstrap interval (users resampled within each seed). Prints JSON rows.
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

from semalign.flows.experiment import load_saved
from semalign.models.metrics import BootstrapFrame, paired_bootstrap


def deltas(base: str, lever: str, label: str, bucket: str = "unseen", reference: str = "aligned_content",
           n_boot: int = 200) -> list[dict]:
    frames, models = [], None
    for path in sorted(glob.glob(f"{lever}.s*.json")):
        seed = int(path.rsplit(".s", 1)[1].split(".")[0])
        _, b = load_saved(Path(f"{base}.s{seed}.json"))
        _, h = load_saved(Path(path))
        if not (np.array_equal(b[seed]["y"], h[seed]["y"]) and np.array_equal(b[seed]["users"], h[seed]["users"])):
            raise ValueError(f"{path}: seed {seed} has other test events than {base}.s{seed}.json")
        sel = np.ones(len(b[seed]["y"]), bool) if bucket == "all" else b[seed]["buckets"] == bucket
        models = sorted(h[seed]["preds"])
        preds = {"reference": b[seed]["preds"][reference][sel], **{m: h[seed]["preds"][m][sel] for m in models}}
        frames.append(BootstrapFrame(b[seed]["y"][sel], b[seed]["users"][sel], preds))
    if not frames:
        raise FileNotFoundError(f"no result files {lever}.s*.json")
    rows = []
    for m in models:
        ci = paired_bootstrap(frames, m, "reference", n_boot=n_boot)
        rows.append({"lever": label, "model": m, "bucket": bucket, "reference": f"{reference} of {Path(base).name}",
                     "seeds": len(frames), "gauc_delta": ci["gauc"], "auc_delta": ci["auc"]})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--lever", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--bucket", default="unseen")
    a = ap.parse_args()
    print(json.dumps(deltas(a.base, a.lever, a.label, a.bucket), indent=2))
