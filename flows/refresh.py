"""The `refresh` flow (design section 6): ingest + validate -> encoder -> codebook (champion's as parent) ->
publish SIDs -> train ranker -> evaluate against the champion on the same window -> drift / quality / churn
gates -> log to MLflow -> promote. One Prefect task per stage; one flow object, run in-process by `semalign run`
(`run_refresh`) and by workers for scheduled deployments (flows/deployment.py).

Re-running on unchanged input trains nothing and publishes nothing: the encoder and codebook stages are keyed
by input hashes, a published codebook version is immutable, and a ranker whose input key is already registered
is reused with its recorded verdict (flows/promotion.py). A refresh holds a lock so two runs never publish at
once (flows/lock.py)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from semalign.checkpoints import checkpoint
from semalign.config import Settings
from semalign.flows import prefect_env, ranker_stages, semantic_ids
from semalign.flows.errors import InputValidationError, LockBusyError, RefreshError, RefreshLockedError, first_line
from semalign.flows.gates import check_codebook, ge_root, run_gates
from semalign.flows.lock import refresh_lock, remove_dead_temporaries
from semalign.flows.mlflow_payload import refresh_payload
from semalign.flows.plots import drift_plot, prefect_artifacts, refresh_plots
from semalign.flows.promotion import StageTracker, champion_lineage, finish_unchanged_input, promote, stage_logger
from semalign.progress import Reporter

__all__ = ["refresh", "run_refresh", "refresh_job", "RefreshError", "InputValidationError", "RefreshLockedError"]
# a hung stage ends the run instead of holding the lock (its lease would keep being renewed) forever
STAGE_TIMEOUT_S = float(os.environ.get("SEMALIGN_STAGE_TIMEOUT_S", 6 * 3600))
STAGE = dict(cache_policy=NO_CACHE, retry_delay_seconds=2, timeout_seconds=STAGE_TIMEOUT_S)
SKIPPED = "Skipped"


# ---------------------------------------------------------------- tasks (bodies live with their stage)

@task(name="ingest + validate", **STAGE)
def ingest_and_validate(settings: Settings, data):
    from semalign.validation.suites import input_suite

    ds = semantic_ids.ingest(settings, data)
    verdict = input_suite(ds.items, ds.interactions, ge_root=ge_root(settings))
    if not verdict.passed:
        raise InputValidationError(f"input validation failed, nothing was published: {verdict.summary()}")
    return ds, verdict


tower_features = task(semantic_ids.tower_features, name="tower features", **STAGE)
train_encoder = task(semantic_ids.encoder_stage, name="train encoder", **STAGE)
build_codebook = task(semantic_ids.codebook_stage, name="build codebook", **STAGE)
publish_ids = task(semantic_ids.publish_stage, name="publish semantic IDs", retries=2, **STAGE)
publish_users = task(ranker_stages.publish_users, name="publish user features", retries=2, **STAGE)
train_ranker = task(ranker_stages.train_ranker_stage, name="train ranker", **STAGE)
judge_window = task(ranker_stages.judge_window, name="evaluate", **STAGE)


# ---------------------------------------------------------------- the flow

@dataclass
class _Run:
    """What an in-process caller hands the flow beside its parameters: its settings (built from flags as well as
    the environment) and its progress display. Deployments have neither and build settings from the environment."""
    settings: Settings
    rep: Reporter


_IN_PROCESS: dict[str, _Run] = {}


@flow(name="refresh", description="Refresh encoder, codebook, semantic IDs and ranker; promote behind gates.",
      timeout_seconds=4 * STAGE_TIMEOUT_S)
def refresh(data: str | None = None, home: str | None = None):
    """Parameters carry only the data path and SEMALIGN_HOME; everything else (credentials included) comes from
    the process environment, so no secret is stored in Prefect. A scheduled run that finds another refresh
    holding the lock ends as Skipped (a completed state, not a failure); `semalign run` reports it as an error."""
    run = _IN_PROCESS.get(str(home))
    if run is not None:
        return refresh_job(run.settings, data, run.rep)
    try:
        return refresh_job(Settings(home=home) if home else Settings(), data, Reporter(quiet=True))
    except LockBusyError as e:
        from prefect.states import Completed

        message = f"skipped: another refresh is running ({first_line(e)})"
        stage_logger().warning(message)
        return Completed(name=SKIPPED, message=message)


def refresh_job(settings: Settings, data=None, rep: Reporter | None = None) -> dict:
    """The body of the `refresh` flow. Returns a summary (what was built, reused, the verdict, the champion)."""
    from semalign.data import settings_split
    from semalign.deploy.registry import Registry

    rep = rep or Reporter(quiet=True)
    t0 = time.perf_counter()
    with StageTracker() as at, refresh_lock(settings) as lock:
        at.lock = lock
        remove_dead_temporaries(settings)  # under the lock: no other refresh is writing them
        if settings.ray_address:  # an unreachable cluster stops the refresh here, before anything is computed
            from semalign.flows import ray_engine

            ray_info = at.run("connect to Ray", ray_engine.cluster_info, settings)
        at("registry lookup")
        registry = Registry(settings)
        champ = champion_lineage(registry)
        at.champion = champ.get("version")
        ds, input_verdict = at.run("ingest", ingest_and_validate, settings, data)
        split = settings_split(ds, settings)
        feats = at.run("towers", tower_features, settings, ds, rep)
        enc = at.run("encoder", train_encoder, settings, ds, split, feats, rep, parent=champ.get("encoder_version"),
                     move_latest=True)
        cb = at.run("codebook", build_codebook, settings, ds, split, enc, parent=champ.get("codebook_version"),
                    rep=rep, move_latest=True)
        health = at.run("codebook health", check_codebook, settings, cb)  # a collapsed codebook is not published
        # readers move to the new version at promotion, not here
        pub = at.run("publish", publish_ids, settings, ds, cb, enc, make_current=not champ, feats=feats)
        users_version = at.run("users", publish_users, settings, ds, split)  # a snapshot; the champion keeps its own
        rk = at.run("ranker", train_ranker, settings, ds, split, cb, enc, feats, registry, rep, users_version)
        summary = {"dataset": ds.name, "data": ds.report, "input_validation": input_verdict.as_dict(),
                   "encoder": {"version": enc.version, "reused": enc.reused, "parent": champ.get("encoder_version"),
                               **{k: v for k, v in enc.metrics.items() if k.startswith("hit@")}},
                   "codebook": {"version": cb.version, "parent": cb.parent, "reused": cb.reused, "churn": cb.churn,
                                "health": health["checks"]},
                   "feature_store": pub, "ranker": {"input_key": rk.input_key, **rk.fit}}
        if settings.ray_address:  # what ran on the cluster (stages that reused their outputs ran nothing)
            summary["ray"] = {**ray_info, "jobs": ray_engine.jobs()}
        if rk.registered is not None:  # these exact inputs were refreshed before: keep that outcome
            summary.update(finish_unchanged_input(settings, registry, rk.registered, champ, at))
        else:
            summary.update(_judge_and_promote(settings, registry, champ, ds, split, feats, enc, cb, rk,
                                              input_verdict, at, rep))
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        at("done")
        if rk.registered is None:
            prefect_artifacts(summary, settings.home / "runs" / rk.input_key / "plots")
        return summary


def _judge_and_promote(settings: Settings, registry, champ: dict, ds, split, feats, enc, cb, rk, input_verdict,
                       at: StageTracker, rep: Reporter) -> dict:
    """Evaluate challenger and champion on the same window, run the gates, log the run, promote if they pass."""
    at("evaluate")
    champ_dir = None
    if champ:
        champ_dir = registry.download_ranker(registry.get_version(champ["version"]),
                                             settings.home / "rankers" / (champ.get("input_key") or f"v{champ['version']}"))
    evaluation = judge_window(settings, ds, split, rk.folder, champ_dir)
    challenger, champion_metrics = evaluation["challenger"], evaluation["champion"]
    at.done("evaluate")
    at("gates")
    compared = (evaluation.get("compared") or {}).get("challenger", challenger)  # on the champion's fresh events
    gates = run_gates(settings, registry, champ, ds, split, cb, evaluation, feats)
    from semalign.validation.suites import data_docs

    gates.extra["data_docs"] = data_docs(ge_root(settings))  # this refresh's suites and results, browsable
    plots_dir = settings.home / "runs" / rk.input_key / "plots"
    refresh_plots(plots_dir, compared, champion_metrics, cb.metrics)
    if gates.reference is not None:
        drift_plot(plots_dir / "drift.png", gates.reference, gates.profile)
    payload = refresh_payload(settings, ds, feats, enc, cb, rk, champ, input_verdict, gates, evaluation, plots_dir)
    _log_specification(payload, rk.folder)
    at("log to MLflow")
    with rep.stage("log to MLflow", None):
        from semalign.flows.sid_bundle import export_sid_bundle

        bundle = settings.home / "runs" / rk.input_key / "sid_bundle"
        export_sid_bundle(settings, cb.version, bundle)  # registered beside the ranker: SIDs beyond the ranker
        run_id, version = registry.log_refresh(params=payload.params, metrics=payload.metrics, tags=payload.tags,
                                               ranker_dir=rk.folder, artifacts=payload.artifacts,
                                               json_artifacts=payload.json_artifacts, input_key=rk.input_key,
                                               sid_bundle=bundle, input_example=_scoreable_rows(split))
    registry.record_gate(version, gates.verdict())
    at.log.info("gates %s: %s", "passed" if gates.passed else "blocked the promotion", gates.summary)
    checkpoint("refresh.before_promote")
    promoted = False
    if gates.passed:
        at("promote")
        promoted = promote(settings, registry, registry.get_version(version),
                           "first model" if not champ else f"refresh passed gates: {gates.summary}")
    return dict(model_version=version, run_id=run_id, verdict=gates.verdict(), promoted=promoted,
                data_docs=gates.extra.get("data_docs"),
                evaluation=evaluation,
                champion=champion_lineage(registry).get("version"))


def _log_specification(payload, ranker_folder) -> None:
    """The trained ranker's specification (encoder, codebook, ranker) as the run's `spec.json` and its params."""
    import json

    path = ranker_folder / ranker_stages.SPEC_FILE
    if not path.exists():  # trained before specifications were written beside rankers
        return
    spec = json.loads(path.read_text())
    payload.json_artifacts["spec.json"] = spec
    payload.params.update({f"{part}.{k}": v for part in ("encoder", "codebook") for k, v in spec[part].items()})


def _scoreable_rows(split, n: int = 3):
    """(user_id, item_id) rows of the training window: users and items the new ranker's store version holds."""
    train = split.part("train")
    return train[["user_id", "item_id"]].drop_duplicates().head(n).reset_index(drop=True)


def run_refresh(settings: Settings, data=None, rep: Reporter | None = None) -> dict:
    """`semalign run`: the refresh flow in-process (Prefect's ephemeral API under SEMALIGN_HOME unless a Prefect
    API is configured), with the progress shown here."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    prefect_env.prepare(settings)  # `semalign run` did this before importing Prefect; other callers get it here

    home = str(settings.home)
    _IN_PROCESS[home] = _Run(settings, rep or Reporter(quiet=True))
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return refresh(data=str(data) if data is not None else None, home=home)
    except RefreshError:
        raise
    except Exception as e:  # the orchestrator itself (its database, its server) failed around the flow
        raise RefreshError(f"the refresh flow could not run: {type(e).__name__}: {first_line(e)}; "
                           "nothing was promoted") from e
    finally:
        _IN_PROCESS.pop(home, None)
