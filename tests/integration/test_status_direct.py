"""`semalign status` reads the champion and challenger from MLflow's tables without importing MLflow (issue 31,
item 7): the same answer as MLflow's client, on a real MLflow sqlite database built by MLflow itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from semalign.config import Settings


def _registry_with_two_versions(home):
    from semalign.deploy.registry import CHALLENGER, CHAMPION, Registry

    s = Settings(home=home)
    reg = Registry(s)  # creates the tracking database through MLflow
    c = reg.client
    c.create_registered_model(s.model_name)
    run = c.create_run(reg.experiment_id)
    for v, cb in ((1, "cb-one"), (2, "cb-two")):
        mv = c.create_model_version(s.model_name, source=f"{reg.artifact_uri}/m{v}", run_id=run.info.run_id)
        for k, val in {"codebook_version": cb, "encoder_version": f"enc-{v}", "data_hash": f"h{v}",
                       "feature_service": f"svc{v}", "input_key": f"k{v}"}.items():
            c.set_model_version_tag(s.model_name, mv.version, k, val)
    c.set_registered_model_alias(s.model_name, CHAMPION, "1")
    c.set_registered_model_alias(s.model_name, CHALLENGER, "2")
    # a third version, deleted: never an answer
    gone = c.create_model_version(s.model_name, source=f"{reg.artifact_uri}/m3", run_id=run.info.run_id)
    c.delete_model_version(s.model_name, gone.version)
    reg.promote("1", reason="first model")
    reg.record_gate("2", {"passed": False, "summary": "label rate"})
    return s, reg


def test_status_reads_mlflow_tables_like_the_client_and_imports_no_mlflow(tmp_path):
    from semalign.deploy.registry import MLFLOW_SCHEMA, Registry, RegistryView

    s, reg = _registry_with_two_versions(tmp_path / "home")
    # the schema the direct read was checked against is the one this MLflow writes
    import sqlalchemy as sa

    with sa.create_engine(s.resolved_tracking_uri()).connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == MLFLOW_SCHEMA
    view = RegistryView(s)
    got = view.status()
    assert view._client_side is None  # read directly, not through the client
    assert got == Registry(s).status()
    assert got["champion"]["version"] == "1" and got["challenger"]["codebook_version"] == "cb-two"
    assert got["current_codebook"] == "cb-one" and not got["last_gate"]["passed"]

    code = ("import json, sys; from semalign.cli import app; app(args=['status', '--json'], standalone_mode=False); "
            "print(json.dumps(sorted(m for m in ('mlflow', 'feast', 'torch') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SEMALIGN_HOME": str(s.home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()
    assert json.loads(out[-1]) == []
    printed = json.loads("\n".join(out[:-1]))
    assert {k: v for k, v in printed.items() if k not in ("lock", "history")} == json.loads(json.dumps(got))


def test_status_reads_directly_only_the_schema_it_was_checked_against(tmp_path):
    from semalign.deploy.registry import MLFLOW_SCHEMA, RegistryView

    s, _ = _registry_with_two_versions(tmp_path / "home")
    import sqlalchemy as sa

    eng = sa.create_engine(s.resolved_tracking_uri())
    with eng.begin() as c:  # as if MLflow had migrated its tables to a schema this reader does not know
        c.execute(sa.text("UPDATE alembic_version SET version_num = 'not-checked'"))
    assert RegistryView(s)._read_aliases() is None  # so status asks MLflow's client, which knows its schema
    with eng.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": MLFLOW_SCHEMA})
    assert RegistryView(s)._read_aliases() is not None
    # a tracking server is always asked through the client
    remote = Settings(home=s.home, mlflow_tracking_uri="http://127.0.0.1:1")
    assert RegistryView(remote)._read_aliases() is None
