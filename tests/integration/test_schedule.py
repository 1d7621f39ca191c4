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
    run = subprocess.run([prefect, "deployment", "run", "refresh/semalign-refresh"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    worker = subprocess.run([prefect, "worker", "start", "--pool", "semalign", "--run-once"], capture_output=True,
                            text=True, env=env, timeout=900)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("refresh/semalign-refresh")
            assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            assert runs and any(r.state.is_completed() for r in runs), [r.state for r in runs]
    status = subprocess.run(cli + ["status", "--home", str(home), "--json"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["champion"]["version"] == "1"
