"""How a refresh finishes: the promotion (feature service, then alias and the store's current pointer), and the
resumption of a promotion an earlier run on the same input passed its gates for but never finished."""
from __future__ import annotations

from semalign.checkpoints import checkpoint
from semalign.config import Settings


def champion_lineage(registry) -> dict:
    from semalign.deploy.registry import CHAMPION

    mv = registry.version_by_alias(CHAMPION)
    if mv is None:
        return {}
    return {"version": str(mv.version), "run_id": mv.run_id, **{k: mv.tags.get(k) for k in
            ("codebook_version", "encoder_version", "data_hash", "input_key")}}


def stage_logger():
    """Prefect's run logger inside a flow run (its lines reach the Prefect API and UI), else a plain logger."""
    import logging

    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # no run context: a direct call of refresh_job
        return logging.getLogger("semalign.refresh")


def carry_to(settings: Settings, registry, mv, store=None) -> dict:
    """Items onboarded under the serving champion's codebook version, onboarded into `mv`'s before `mv` serves:
    an item onboarded under v1 stays servable once v2 is promoted (or rolled back to)."""
    from semalign.deploy.registry import CHAMPION
    from semalign.feature_repo.store import open_store

    cur = registry.version_by_alias(CHAMPION)
    return carry_onboarded(settings, store or open_store(settings), cur.tags.get("codebook_version") if cur else None,
                           mv.tags.get("codebook_version"))


def carry_onboarded(settings: Settings, store, from_version: str | None, to_version: str) -> dict:
    """Items onboarded under `from_version` that `to_version` does not hold, onboarded into it: re-encoded with its
    encoder (and rotation) from the text-tower vectors the store keeps, then given SIDs by its codebook. Nothing
    onboarded is lost when a new codebook version takes over. Items stored without a text-tower vector cannot be
    re-encoded and are counted; an item's image does not travel (its features are not stored)."""
    if not from_version or from_version == to_version:
        return {"carried": 0, "without_content": 0}
    todo = sorted(set(store.catalogue.onboarded_items(from_version))
                  - {i for _, i in store.catalogue.held([to_version])})
    if not todo:
        return {"carried": 0, "without_content": 0}
    levels = store.catalogue.published(from_version)["levels"]
    _, found, _, content = store.read_online(todo, from_version, levels, with_content=True)
    keep = [j for j, f in enumerate(found) if f and content[j] is not None and len(content[j])]
    if keep:
        import numpy as np
        import pandas as pd

        from semalign.feature_repo.embedder import ItemEmbedder

        text = np.stack([content[j] for j in keep]).astype(np.float32)
        emb = ItemEmbedder(settings, to_version).embed_text_vectors(text)
        store.onboard(pd.DataFrame({"item_id": [todo[j] for j in keep]}), version=to_version, embeddings=emb,
                      content=text)
    return {"carried": len(keep), "without_content": len(todo) - len(keep)}


def promote(settings: Settings, registry, mv, reason: str, store=None) -> bool:
    """Onboarded items carried into the new champion's codebook version and its feature service registered first
    (so nothing it serves is missing), then the alias and the store's current pointer."""
    from semalign.feature_repo.store import SemanticIdStore

    carry_to(settings, registry, mv, store)
    (store or SemanticIdStore(settings)).register_ranker_service(mv.tags["feature_service"], mv.tags["codebook_version"],
                                                      tags={"model": settings.model_name, "model_version": str(mv.version)})
    checkpoint("refresh.after_feature_service")
    return bool(registry.promote(str(mv.version), reason=reason)["moved"])


def interrupted_before_promotion(registry, mv, champion: str | None) -> bool:
    """True when `mv` passed its gates against the current champion but was never champion (no promotion or
    rollback ever named it): its refresh stopped between recording the verdict and moving the alias."""
    if champion == str(mv.version):
        return False
    named = registry.history(actions=("promote", "rollback"), limit=10_000)
    if any(str(mv.version) in (h["to_value"], h["from_value"]) for h in named):
        return False
    before = registry.client.get_run(mv.run_id).data.params.get("champion_before")
    return before == str(champion)  # else its gates compared it with another champion: not valid today


def finish_unchanged_input(settings: Settings, registry, version: str, champ: dict, run) -> dict:
    """These exact inputs were refreshed before (model `version`): keep that outcome, finishing a promotion the
    earlier run passed its gates for but did not complete (`run`, the refresh's RefreshRun, enters the stage and
    holds the store). Returns the summary fields."""
    mv = registry.get_version(version)
    passed = mv.tags.get("gate") == "passed"
    out = dict(model_version=version, promoted=False, verdict={"passed": passed, "reused": True},
               note="unchanged input: nothing retrained, published or promoted")
    if passed and interrupted_before_promotion(registry, mv, champ.get("version")):
        run("promote")
        gates = registry.history(actions=("gate",), limit=10_000)
        if not any(h["subject"].endswith(f"/{mv.version}") for h in gates):  # it died before this row
            verdict = registry.run_artifact_json(mv.run_id, "validation_report.json") or {}
            registry.record_gate(str(mv.version), {**verdict, "passed": True})
        out["promoted"] = promote(settings, registry, mv, f"resumed: v{mv.version} passed its gates "
                                  "in a refresh that stopped before promotion", store=run.store)
        out["note"] = "finished the promotion of an interrupted refresh on the same input"
    elif champ.get("version") == str(mv.version):  # finishes a promotion a crash cut after the alias move
        out["promoted"] = registry.promote(str(mv.version), reason="re-run")["moved"]
    out["champion"] = champion_lineage(registry).get("version")
    return out
