"""The scale-out topology of deploy/compose.yaml, brought up from Debian and PyPI services on loopback:
Postgres (Feast SQL registry + offline store, MLflow backend, Prefect backend, semalign state), Redis (online
store), an S3-compatible server (moto_server) for artifacts, `mlflow server`, `prefect server`, a process
worker, and `semalign serve` with two workers. One scheduled refresh and one scoring request go through it,
with configuration only (SEMALIGN_* / MLFLOW_* / PREFECT_* variables), no code change."""
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import SMALL_REFRESH, free_port, wait_for_port, write_generic

PG = "postgresql://postgres@127.0.0.1:5432"
BIN = Path(sys.executable).parent



def _wait_http(url: str, timeout: float = 180, proc=None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} never answered" + (f":\n{Path(log).read_text()[-3000:]}" if log else ""))


@pytest.fixture
def topology(tmp_path):
    import sqlalchemy as sa

    tag = uuid.uuid4().hex[:8]
    dbs = {k: f"semalign_{k}_{tag}" for k in ("mlflow", "prefect", "main")}
    eng = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://") + "/postgres", isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        for db in dbs.values():
            c.execute(sa.text(f'CREATE DATABASE "{db}"'))
    procs = []

    def start(name, args, env):
        log = tmp_path / f"{name}.log"
        p = subprocess.Popen(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p, log

    base_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "AWS_ACCESS_KEY_ID": "topology-key", "AWS_SECRET_ACCESS_KEY": "topology-secret",
                "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        s3_port = free_port()
        s3, s3_log = start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], base_env)
        s3_url = f"http://127.0.0.1:{s3_port}"
        wait_for_port(s3_port)
        import boto3

        boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="topology-key",
                     aws_secret_access_key="topology-secret", region_name="us-east-1").create_bucket(Bucket="semalign")
        env = {**base_env, "MLFLOW_S3_ENDPOINT_URL": s3_url}

        ml_port = free_port()
        ml, ml_log = start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ml_port),
                                      "--backend-store-uri", f"{PG.replace('postgresql://', 'postgresql+psycopg://')}/{dbs['mlflow']}",
                                      "--default-artifact-root", "s3://semalign/mlflow", "--no-serve-artifacts",
                                      "--workers", "1"], env)
        pf_port = free_port()
        pf_env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{dbs['prefect']}"}
        pf, pf_log = start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pf_port)],
                           pf_env)
        _wait_http(f"http://127.0.0.1:{ml_port}/health", proc=ml, log=ml_log)
        _wait_http(f"http://127.0.0.1:{pf_port}/api/health", proc=pf, log=pf_log)
        main_pg = f"{PG}/{dbs['main']}"
        semalign_env = {
            **env, "SEMALIGN_HOME": str(tmp_path / "home"), "SEMALIGN_FEAST_PROJECT": f"topo{tag}",
            "SEMALIGN_FEAST_ONLINE": "redis", "SEMALIGN_REDIS_URL": "127.0.0.1:6379",
            "SEMALIGN_FEAST_OFFLINE": "postgres", "SEMALIGN_FEAST_REGISTRY": "sql", "SEMALIGN_POSTGRES_URL": main_pg,
            "SEMALIGN_STATE_URL": main_pg.replace("postgresql://", "postgresql+psycopg://"),
            "SEMALIGN_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml_port}", "SEMALIGN_ARTIFACT_URI": "s3://semalign/mlflow",
            "PREFECT_API_URL": f"http://127.0.0.1:{pf_port}/api", "PREFECT_HOME": str(tmp_path / "prefect-client"),
            **SMALL_REFRESH,
        }
        yield {"env": semalign_env, "start": start, "tmp": tmp_path, "s3": s3_url}
    finally:
        import signal

        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        with eng.connect() as c:
            for db in dbs.values():
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        eng.dispose()


def test_one_refresh_and_one_scoring_request_through_the_scale_out_topology(topology, movielens):
    env, start, tmp = topology["env"], topology["start"], topology["tmp"]
    shop = write_generic(tmp / "shop", movielens, n_items=200)
    cli = [sys.executable, "-m", "semalign.cli"]
    out = subprocess.run(cli + ["schedule", "--cron", "0 3 * * *", "--data", str(shop), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "refresh/semalign-refresh"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "semalign", "--run-once"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    status = subprocess.run(cli + ["status", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    st = json.loads(status.stdout)
    assert st["champion"] and st["champion"]["version"] == "1", (st, worker.stdout[-3000:])
    assert st["tracking_uri"].startswith("http://") and st["artifact_uri"].startswith("s3://")
    assert st["current_codebook"] == st["champion"]["codebook_version"]

    port = free_port()
    srv, log = start("serve", cli + ["serve", "--port", str(port), "--workers", "2"], env)
    _wait_http(f"http://127.0.0.1:{port}/health", proc=srv, log=log)
    body = {"user_id": "u1", "candidates": [{"item_id": f"sku-{i}"} for i in range(1, 21)] +
            [{"item_id": "topology-new", "text": "A western about two rival ferrymen. Genres: Western"}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        res = json.loads(r.read())
    assert res["model_version"] == "1" and res["codebook_version"] == st["champion"]["codebook_version"]
    assert len(res["items"]) == 21 and all(0 < it["score"] < 1 for it in res["items"])
    assert next(it for it in res["items"] if it["item_id"] == "topology-new")["source"] == "on_the_fly"
