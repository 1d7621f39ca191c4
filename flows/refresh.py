"""The `refresh` flow (design section 6): ingest + validate -> towers -> encoder -> codebook (champion's as parent)
-> publish SIDs -> train ranker -> evaluate against the champion on the same window -> drift / quality / churn gates
-> log to MLflow -> promote. One Prefect task per stage, so Prefect's task states record where a run is and where it
stopped; one `RefreshRun` carries the run's settings, progress display, compute engine (flows/engines.py), the
registry and feature store (opened once) and what each stage produced. The flow runs in-process for `semalign run`
(`run_refresh`) and on workers for scheduled deployments (flows/deployment.py).

Re-running on unchanged input trains nothing and publishes nothing: the encoder and codebook stages are keyed
by input hashes, a published codebook version is immutable, and a ranker whose input key is already registered
is reused with its recorded verdict (flows/promotion.py). A refresh holds a lock so two runs never publish at
once (flows/lock.py)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from semalign.checkpoints import checkpoint
from semalign.config import Settings
from semalign.flows import prefect_env, ranker_stages, semantic_ids
from semalign.flows.errors import InputValidationError, LockBusyError, RefreshError, RefreshLockedError, first_line
from semalign.flows.gates import check_codebook, ge_root, run_gates
from semalign.flows.lock import refresh_lock, remove_dead_temporaries
from semalign.flows.mlflow_payload import refresh_payload
from semalign.flows.pipeline import Upstream, upstream
from semalign.flows.plots import drift_plot, prefect_artifacts, refresh_plots
from semalign.flows.promotion import champion_lineage, finish_unchanged_input, promote, stage_logger
from semalign.progress import Reporter

__all__ = ["refresh", "run_refresh", "refresh_job", "RefreshRun", "RefreshError", "InputValidationError",
           "RefreshLockedError"]
# a hung stage ends the run instead of holding the lock (its lease would keep being renewed) forever
STAGE_TIMEOUT_S = float(os.environ.get("SEMALIGN_STAGE_TIMEOUT_S", 6 * 3600))
STAGE = dict(cache_policy=NO_CACHE, retry_delay_seconds=2, timeout_seconds=STAGE_TIMEOUT_S)
RETRIED = ("publish", "users")   # idempotent writes to the store: retried on a transient failure
# the Prefect task name of a stage where it says more than the stage's short name
TASK_NAMES = {"ingest": "ingest + validate", "towers": "tower features", "encoder": "train encoder",
              "codebook": "build codebook", "publish": "publish semantic IDs", "users": "publish user features",
              "ranker": "train ranker"}
FLOW = dict(name="refresh", description="Refresh encoder, codebook, semantic IDs and ranker; promote behind gates.",
            timeout_seconds=4 * STAGE_TIMEOUT_S)
SKIPPED = "Skipped"


@dataclass
class RefreshRun:
    """One refresh: what it was given, what it opens once, and what its stages produced. A stage that needs a new
    input reads it here (add a field), so no stage takes a long argument list."""
    settings: Settings
    data: str | None = None
    rep: Reporter = field(default_factory=lambda: Reporter(quiet=True))
    engine: Any = None                # flows/engines.py: chosen once from the settings
    registry: Any = None              # deploy.registry.Registry
    champ: dict = field(default_factory=dict)    # the champion's lineage (empty: no champion yet)
    lock: Any = None                  # the refresh lock held (checked before each stage)
    up: Upstream | None = None        # ingest -> towers -> encoder -> codebook
    pub: dict | None = None           # what publishing the SIDs did
    users_version: str | None = None  # the user-feature snapshot the ranker trains with
    rk: Any = None                    # ranker_stages.RankerOut
    stage_name: str = "take the refresh lock"
    _store: Any = None

    def __post_init__(self):
        from semalign.flows.engines import compute_engine

        self.engine = self.engine or compute_engine(self.settings)
        self.log = stage_logger()

    @property
    def store(self):
        """The feature store, opened once for the whole refresh (publish, users, evaluation, promotion)."""
        if self._store is None:
            from semalign.feature_repo.store import open_store

            self._store = open_store(self.settings)
        return self._store

    def __call__(self, name: str) -> None:
        """Enters stage `name`: a holder whose lock was forced open stops here."""
        if self.lock is not None:
            self.lock.check()
        self.stage_name = name

    def stage(self, name: str, fn, *args, **kwargs):
        """Runs `fn` as the Prefect task of stage `name` (its state is the stage's record); its end is a checkpoint
        (a kill point for the fault-injection tests)."""
        self(name)
        out = task(fn, name=TASK_NAMES.get(name, name), retries=2 if name in RETRIED else 0, **STAGE)(*args, **kwargs)
        checkpoint(f"refresh.after_{name.replace(' ', '_')}")
        return out

    def failed(self, err: Exception) -> RefreshError:
        """The error a failed stage ends the refresh with: where it stopped and whether anything moved."""
        champ = f"champion v{self.champ['version']}" if self.champ.get("version") else "the champion"
        if self.stage_name in ("promote", "done"):
            after = ("promotion may be partly done; `semalign status` shows where the champion and the current "
                     "codebook stand and re-running the refresh finishes it")
        else:
            after = f"nothing was promoted ({champ} and the semantic IDs it serves are unchanged)"
        self.log.error("stage %s: failed: %s: %s", self.stage_name, type(err).__name__, first_line(err))
        return RefreshError(f"refresh failed at stage '{self.stage_name}': {type(err).__name__}: "
                            f"{first_line(err)}; {after}")


# ---------------------------------------------------------------- the flow

@flow(**FLOW)
def refresh(data: str | None = None, home: str | None = None):
    """The deployed flow. Parameters carry only the data path and SEMALIGN_HOME; everything else (credentials
    included) comes from the process environment, so no secret is stored in Prefect. A scheduled run that finds
    another refresh holding the lock ends as Skipped (a completed state, not a failure)."""
    try:
        return refresh_job(RefreshRun(Settings(home=home) if home else Settings(), data=data))
    except LockBusyError as e:
        from prefect.states import Completed

        message = f"skipped: another refresh is running ({first_line(e)})"
        stage_logger().warning(message)
        return Completed(name=SKIPPED, message=message)


def refresh_job(run: RefreshRun) -> dict:
    """The body of the `refresh` flow. Returns a summary (what was built, reused, the verdict, the champion)."""
    t0 = time.perf_counter()
    try:
        with refresh_lock(run.settings) as lock:
            run.lock = lock
            remove_dead_temporaries(run.settings)  # under the lock: no other refresh is writing them
            return _refresh(run, t0)
    except RefreshError:
        raise
    except Exception as err:
        raise run.failed(err) from err


def _lookup_champion(run: RefreshRun) -> None:
    from semalign.deploy.registry import Registry

    run.registry = Registry(run.settings)
    run.champ = champion_lineage(run.registry)


def _refresh(run: RefreshRun, t0: float) -> dict:
    settings, rep = run.settings, run.rep
    # where it computes; an unreachable cluster stops the refresh here, before anything is computed
    engine_info = run.stage("compute engine", run.engine.connect)
    run.stage("registry lookup", _lookup_champion, run)
    champ = run.champ
    run.up = up = upstream(settings, run.data, rep, validate=True, engine=run.engine, stage=run.stage,
                           encoder_parent=champ.get("encoder_version"), codebook_parent=champ.get("codebook_version"),
                           move_latest=True)
    ds, split, feats, enc, cb = up.ds, up.split, up.feats, up.enc, up.cb
    health = run.stage("codebook health", check_codebook, settings, cb)  # a collapsed codebook is not published
    # readers move to the new version at promotion, not here
    run.pub = run.stage("publish", semantic_ids.publish_stage, settings, ds, cb, enc, make_current=not champ,
                        feats=feats, store=run.store)
    # a snapshot; the champion keeps its own
    run.users_version = run.stage("users", ranker_stages.publish_users, settings, ds, split, store=run.store)
    run.rk = rk = run.stage("ranker", ranker_stages.train_ranker_stage, settings, ds, split, cb, enc, feats,
                            run.registry, rep, run.users_version, engine=run.engine)
    summary = {"dataset": ds.name, "data": ds.report, "input_validation": up.input_verdict.as_dict(),
               "encoder": {"version": enc.version, "reused": enc.reused, "parent": champ.get("encoder_version"),
                           **{k: v for k, v in enc.metrics.items() if k.startswith("hit@")}},
               "codebook": {"version": cb.version, "parent": cb.parent, "reused": cb.reused, "churn": cb.churn,
                            "health": health["checks"]},
               "feature_store": run.pub, "ranker": {"input_key": rk.input_key, **rk.fit}}
    if engine_info:  # what ran on the cluster (stages that reused their outputs ran nothing)
        summary[run.engine.name] = {**engine_info, "jobs": run.engine.jobs()}
    if rk.registered is not None:  # these exact inputs were refreshed before: keep that outcome
        summary.update(finish_unchanged_input(settings, run.registry, rk.registered, champ, run))
    else:
        summary.update(_judge_and_promote(run))
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    run("done")
    if rk.registered is None:
        prefect_artifacts(summary, settings.home / "runs" / rk.input_key / "plots")
    return summary


def _evaluate(run: RefreshRun) -> dict:
    """The challenger, and the champion beside it, on the same window through the serving path."""
    settings, champ, registry = run.settings, run.champ, run.registry
    champ_dir = None
    if champ:
        champ_dir = registry.download_ranker(registry.get_version(champ["version"]),
                                             settings.home / "rankers" / (champ.get("input_key") or f"v{champ['version']}"))
    return ranker_stages.judge_window(settings, run.up.ds, run.up.split, run.rk.folder, champ_dir, store=run.store)


def _judge(run: RefreshRun, evaluation: dict):
    """The gates on this window, the plots and what the run logs to MLflow."""
    settings, up, rk = run.settings, run.up, run.rk
    compared = (evaluation.get("compared") or {}).get("challenger", evaluation["challenger"])  # champion's events
    gates = run_gates(settings, run.registry, run.champ, up.ds, up.split, up.cb, evaluation, up.feats)
    from semalign.validation.suites import data_docs

    gates.extra["data_docs"] = data_docs(ge_root(settings))  # this refresh's suites and results, browsable
    plots_dir = settings.home / "runs" / rk.input_key / "plots"
    refresh_plots(plots_dir, compared, evaluation["champion"], up.cb.metrics)
    if gates.reference is not None:
        drift_plot(plots_dir / "drift.png", gates.reference, gates.profile)
    payload = refresh_payload(settings, up.ds, up.feats, up.enc, up.cb, rk, run.champ, up.input_verdict, gates,
                              evaluation, plots_dir)
    _log_specification(payload, rk.folder)
    return gates, payload


def _log_to_mlflow(run: RefreshRun, gates, payload) -> tuple[str, str]:
    """The run, its artifacts and the registered model version (the SID bundle beside the ranker), and the verdict."""
    from semalign.flows.sid_bundle import export_sid_bundle

    settings, rk = run.settings, run.rk
    with run.rep.stage("log to MLflow", None):
        bundle = settings.home / "runs" / rk.input_key / "sid_bundle"
        export_sid_bundle(settings, run.up.cb.version, bundle, store=run.store)  # SIDs beyond the ranker
        run_id, version = run.registry.log_refresh(
            params=payload.params, metrics=payload.metrics, tags=payload.tags, ranker_dir=rk.folder,
            artifacts=payload.artifacts, json_artifacts=payload.json_artifacts, input_key=rk.input_key,
            sid_bundle=bundle, input_example=_scoreable_rows(run.up.split))
    run.registry.record_gate(version, gates.verdict())
    return run_id, version


def _judge_and_promote(run: RefreshRun) -> dict:
    """Evaluate challenger and champion on the same window, run the gates, log the run, promote if they pass."""
    registry, champ = run.registry, run.champ
    evaluation = run.stage("evaluate", _evaluate, run)
    gates, payload = run.stage("gates", _judge, run, evaluation)
    run_id, version = run.stage("log to MLflow", _log_to_mlflow, run, gates, payload)
    run.log.info("gates %s: %s", "passed" if gates.passed else "blocked the promotion", gates.summary)
    checkpoint("refresh.before_promote")
    promoted = False
    if gates.passed:
        promoted = run.stage("promote", promote, run.settings, registry, registry.get_version(version),
                             "first model" if not champ else f"refresh passed gates: {gates.summary}", store=run.store)
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
    API is configured), with the settings built from flags as well as the environment and the progress shown
    here: the flow is the deployed one's twin (same name and parameters) whose body runs this RefreshRun."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    prefect_env.prepare(settings)  # `semalign run` did this before importing Prefect; other callers get it here
    run = RefreshRun(settings, data=str(data) if data is not None else None, rep=rep or Reporter(quiet=True))

    @flow(**FLOW)
    def refresh(data: str | None = None, home: str | None = None):
        return refresh_job(run)

    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return refresh(data=run.data, home=str(settings.home))
    except RefreshError:
        raise
    except Exception as e:  # the orchestrator itself (its database, its server) failed around the flow
        raise RefreshError(f"the refresh flow could not run: {type(e).__name__}: {first_line(e)}; "
                           "nothing was promoted") from e
