"""`semalign schedule` creates a cron deployment that a real local Prefect server and process worker run."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import SMALL_REFRESH, free_port, write_generic



@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "WARNING"}
    exe = Path(sys.executable).with_name("prefect")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("prefect server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
    yield env
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_a_scheduled_deployment_runs_once_through_server_and_worker(tmp_path, movielens, prefect_server):
    env = {**prefect_server, **SMALL_REFRESH}
    shop = write_generic(tmp_path / "shop", movielens, n_items=200)
    home = tmp_path / "home"
    cli = [sys.executable, "-m", "semalign.cli"]
    out = subprocess.run(cli + ["schedule", "--cron", "0 3 * * *", "--data", str(shop), "--home", str(home), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sched = json.loads(out.stdout)["schedule"]
    assert sched["cron"] == "0 3 * * *" and sched["deployment"] == "refresh/semalign-refresh"

    prefect = str(Path(sys.executable).with_name("prefect"))
    worker_env = {**env, "PREFECT_LOGGING_LEVEL": "INFO"}   # a worker's default: its runs' logs reach the API

    def run_once():
        run = subprocess.run([prefect, "deployment", "run", "refresh/semalign-refresh"], capture_output=True,
                             text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        worker = subprocess.run([prefect, "worker", "start", "--pool", "semalign", "--run-once"],
                                capture_output=True, text=True, env=worker_env, timeout=900)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from semalign.config import Settings
    from semalign.flows.lock import refresh_lock

    def latest_run():
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name("refresh/semalign-refresh")
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                ran = max((r for r in runs if r.start_time is not None), key=lambda r: r.start_time)  # not the cron's
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[ran.id])))
                return dep, ran, [entry.message for entry in logs]

    # a refresh started elsewhere holds the lock: the scheduled run is skipped, not failed, and says why
    with refresh_lock(Settings(home=home)):
        run_once()
    dep, skipped, logs = latest_run()
    assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
    assert dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert skipped.state.is_completed() and skipped.state.name == "Skipped", skipped.state
    assert "skipped: another refresh is running" in skipped.state.message
    assert any("skipped: another refresh is running" in m for m in logs), logs

    run_once()
    _, done, logs = latest_run()
    assert done.state.is_completed() and done.state.name == "Completed", done.state
    # every stage is a Prefect task whose state the UI shows; the verdict is in the run's log
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            tasks = {t.name.rsplit("-", 1)[0]: t.state for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[done.id])))}
    for stage in ("ingest + validate", "tower features", "train encoder", "build codebook", "codebook health",
                  "publish semantic IDs", "publish user features", "train ranker", "evaluate", "gates",
                  "log to MLflow", "promote"):
        assert stage in tasks and tasks[stage].is_completed(), (stage, sorted(tasks))
    assert any(m.startswith("gates ") for m in logs), logs
    # the verdict, the AUC table and the plots are artifacts of the run, which the UI shows
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            arts = {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[done.id])))}
    assert {"refresh-verdict", "refresh-auc", "refresh-plots"} <= set(arts), sorted(arts)
    assert "![auc" in arts["refresh-plots"].data and "data:image/png;base64," in arts["refresh-plots"].data
    status = subprocess.run(cli + ["status", "--home", str(home), "--json"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["champion"]["version"] == "1"
