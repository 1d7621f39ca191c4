"""What a refresh logs to MLflow: params (the ranker specification included), metrics, tags, artifact folders and
JSON reports, assembled from the stages' typed results."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from semalign.artifacts import codebook_folder
from semalign.config import Settings


@dataclass
class RunPayload:
    params: dict
    metrics: dict
    tags: dict
    artifacts: dict[str, Path]
    json_artifacts: dict[str, dict]


def _metric_key(bucket: str) -> str:  # MLflow metric names allow no '+'
    return bucket.replace("+", "plus")


def refresh_payload(settings: Settings, ds, feats, enc, cb, rk, champ: dict, input_verdict, gates,
                    evaluation: dict, plots_dir: Path) -> RunPayload:
    from semalign.spec import ranker_config, selected_spec

    challenger, champion_metrics = evaluation["challenger"], evaluation.get("champion")

    metrics = {f"challenger_{m}_{_metric_key(b)}": v[m] for b, v in challenger.items() for m in ("auc", "gauc")}
    if champion_metrics:
        metrics.update({f"champion_{m}_{_metric_key(b)}": v[m] for b, v in champion_metrics.items()
                        for m in ("auc", "gauc")})
    if evaluation.get("compared"):  # the events challenger and champion were judged on
        metrics["compared_events"] = evaluation["compared"]["events"]
    metrics.update({f"encoder_{k.replace('@', '_at_')}_{k2}": v2 for k, v in enc.metrics.items()
                    if k.startswith("hit@") for k2, v2 in v.items()})
    if cb.churn:
        metrics["sid_churn"] = cb.churn["churn"]
        metrics.update({f"sid_churn_level{i}": c for i, c in enumerate(cb.churn["per_level"])})
    for k in ("catalogue_collision_rate", "relative_recon_error"):
        if isinstance(cb.metrics.get(k), (int, float)):
            metrics[f"codebook_{k}"] = cb.metrics[k]
    tags = {"codebook_version": cb.version, "encoder_version": enc.version, "data_hash": ds.content_hash(),
            "gate": "passed" if gates.passed else "failed", "dataset": ds.name,
            # lineage: where the data came from and which partitions (the hash is the content's, source-independent)
            **{f"data_partitions_{k}": str(v) for k, v in (ds.report.get("partitions") or {}).items()},
            **({"data_source": ds.report["source"]} if ds.report.get("source") else {}),
            "feature_service": f"{settings.model_name.replace('-', '_')}_{rk.input_key}",
            **({"data_docs": gates.extra["data_docs"]} if gates.extra.get("data_docs") else {})}
    params = {"split": settings.split, "seed": settings.seed, "cold_item_share": settings.cold_item_share,
              "ranker_epochs": settings.ranker_epochs, "hist_len": settings.hist_len,
              "codebook_method": settings.codebook_method, "codebook_levels": settings.codebook_levels,
              "encoder_epochs": settings.encoder_epochs, "text_model": feats.text_model,
              "image_model": feats.image_model, "champion_before": champ.get("version"),
              "feast_project": settings.feast_project, "online_store": settings.feast_online,
              "val_cold_item_share": settings.val_cold_item_share,
              # the ranker specification the experiment measures and this run trained
              **{f"ranker.{k}": v for k, v in asdict(ranker_config(settings)).items()}}
    artifacts = {"plots": plots_dir, "encoder": settings.encoders_dir / enc.version,
                 "codebook": codebook_folder(settings, cb.version).path}
    json_artifacts = {"validation_report.json": {"input": input_verdict.as_dict(), **gates.verdict()},
                      "reference_profile.json": gates.profile,
                      "evaluation.json": evaluation,
                      "data_lineage.json": {"source": ds.report.get("source"), "partitions": ds.partitions,
                                            "negatives": ds.negatives}}
    spec = selected_spec(settings)
    params["ranker.spec"] = spec["model"] if spec else "settings"
    params["serving_profile"] = settings.serving_profile
    if spec:  # why this model: the selection's pseudo-cold validation table
        json_artifacts["ranker_spec.json"] = spec
    return RunPayload(params, metrics, tags, artifacts, json_artifacts)
