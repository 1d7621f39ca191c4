"""What a refresh shows people: the AUC-per-bucket, codebook-utilisation and drift plots (logged to MLflow with
the run) and the verdict and AUC table as Prefect artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def drift_plot(path: Path, reference: dict, profile: dict) -> None:
    """Reference window vs new window: item popularity bins, label rate, first SID level's code usage."""
    import matplotlib.pyplot as plt

    panels = [("item popularity (log2 bins)", reference["pop_weights"], profile["pop_weights"])]
    first = next(iter(sorted(reference.get("sid_weights", {}))), None)
    if first and first in profile.get("sid_weights", {}):
        k = min(len(reference["sid_weights"][first]), len(profile["sid_weights"][first]))
        panels.append((f"{first} code usage", reference["sid_weights"][first][:k], profile["sid_weights"][first][:k]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3))
    for ax, (title, ref, new) in zip(axes, panels):
        xs = np.arange(len(ref))
        ax.bar(xs - 0.2, ref, 0.4, label="champion window")
        ax.bar(xs + 0.2, new, 0.4, label="new window")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    axes[-1].bar(["champion", "new"], [reference["label_rate"], profile["label_rate"]], color=["C0", "C1"])
    axes[-1].set_title("label rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prefect_artifacts(summary: dict, plots_dir: Path | None = None) -> None:
    """The refresh's verdict, AUC table and plots (PNG embedded in markdown, which the UI renders) as Prefect
    artifacts; best effort."""
    try:
        import base64

        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        pngs = sorted(Path(plots_dir).glob("*.png")) if plots_dir is not None else []
        if pngs:
            create_markdown_artifact(key="refresh-plots", description="semalign refresh plots", markdown="\n\n".join(
                f"**{p.stem.replace('_', ' ')}**\n\n![{p.stem}](data:image/png;base64,"
                f"{base64.b64encode(p.read_bytes()).decode()})" for p in pngs))

        v = summary.get("verdict") or {}
        create_markdown_artifact(key="refresh-verdict", description="semalign refresh verdict", markdown=(
            f"**model version {summary.get('model_version')}**, codebook `{summary['codebook']['version']}`: "
            f"{'promoted' if summary.get('promoted') else 'not promoted'}\n\n{v.get('summary', '')}"))
        ev = summary.get("evaluation") or {}
        rows = [{"bucket": b, "challenger_auc": round(m["auc"], 4),
                 "champion_auc": round(((ev.get("champion") or {}).get(b) or {}).get("auc", float("nan")), 4)}
                for b, m in ((ev.get("compared") or {}).get("challenger") or ev.get("challenger") or {}).items()]
        if rows:
            create_table_artifact(key="refresh-auc", table=rows, description="AUC per item bucket, test window")
    except Exception:
        pass


def refresh_plots(folder: Path, challenger: dict, champion: dict | None, cb_metrics: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semalign.data import ALL_BUCKETS

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    buckets = [b for b in ALL_BUCKETS if b in challenger]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = np.arange(len(buckets))
    ax.bar(xs - 0.2, [challenger[b]["auc"] for b in buckets], 0.4, label="challenger")
    if champion:
        ax.bar(xs + 0.2, [champion.get(b, {}).get("auc", np.nan) for b in buckets], 0.4, label="champion")
    ax.set_xticks(xs, buckets)
    ax.set_ylim(0.5, max(0.8, max(challenger[b]["auc"] for b in buckets) + 0.02))
    ax.set_ylabel("AUC (test window)")
    ax.set_title("AUC per item bucket")
    ax.legend()
    fig.tight_layout()
    out["auc_per_bucket.png"] = folder / "auc_per_bucket.png"
    fig.savefig(out["auc_per_bucket.png"], dpi=110)
    plt.close(fig)
    util = cb_metrics.get("utilisation") or cb_metrics.get("utilization")
    if util:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(range(len(util)), util)
        ax.set_xlabel("level")
        ax.set_ylabel("share of codes used")
        ax.set_ylim(0, 1.05)
        ax.set_title("Codebook utilisation")
        fig.tight_layout()
        out["codebook_utilisation.png"] = folder / "codebook_utilisation.png"
        fig.savefig(out["codebook_utilisation.png"], dpi=110)
        plt.close(fig)
    return out
