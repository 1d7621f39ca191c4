"""`semalign status` reads the champion and challenger from MLflow's tables without importing MLflow (issue 31,
item 7): the same answer as MLflow's client, on a real MLflow sqlite database built by MLflow itself; and what status,
the serving side and the gates say when that state is odd (issue 32, item 5): a promotion reason that looks like
markup, a champion alias naming a version that is gone, a state database that is not one, a champion whose logged
record cannot be read. One registry for the module, its tests in order."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from semalign.config import Settings

REASON = "moved by hand [/x] after [bold]the[/bold] outage"


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


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return _registry_with_two_versions(tmp_path_factory.mktemp("status") / "home")


def _status(home, *args):
    return subprocess.run([sys.executable, "-m", "semalign.cli", "status", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SEMALIGN_HOME": str(home)})


def test_status_reads_mlflow_tables_like_the_client_and_imports_no_mlflow(registry):
    from semalign.deploy.registry import MLFLOW_SCHEMA, Registry, RegistryView

    s, reg = registry
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


def test_status_reads_directly_only_the_schema_it_was_checked_against(registry):
    from semalign.deploy.registry import MLFLOW_SCHEMA, RegistryView

    s, _ = registry
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


def test_a_reason_that_looks_like_markup_is_printed_as_written(registry):
    s, reg = registry
    reg.promote("2", reason=REASON)
    proc = _status(s.home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert REASON in proc.stdout


def test_a_dangling_champion_alias_is_named_not_read_as_no_champion_yet(registry):
    from semalign.deploy.champion import ChampionHolder
    from semalign.deploy.registry import DanglingAliasError, Registry, RegistryView

    s, reg = registry
    with sa.create_engine(s.resolved_tracking_uri()).begin() as c:  # the version the alias names is gone
        c.execute(sa.text("UPDATE registered_model_aliases SET version = 99 WHERE alias = 'champion'"))
    try:
        for view in (RegistryView(s), Registry(s)):  # MLflow's tables read directly, and MLflow's client
            with pytest.raises(DanglingAliasError, match="points at version 99, which does not exist"):
                view.version_by_alias("champion")
            got = view.status()
            assert got["champion"] is None and "points at version 99" in got["warning"]
        holder = ChampionHolder(s, check_interval_s=3600)
        holder.check()
        assert holder.served is None and "points at version 99" in holder.error
        assert "no champion yet" not in holder.error
        proc = _status(s.home)
        assert proc.returncode == 0 and "points at version 99" in " ".join(proc.stdout.split()), proc.stderr[-2000:]
    finally:
        moved = reg.promote("1", reason="repair the dangling alias")  # a promotion repairs it
    assert moved["moved"] and moved["previous"] == "99" and RegistryView(s).version_by_alias("champion").version == "1"


def test_a_state_database_that_is_not_one_is_one_line_naming_the_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "state.db").write_bytes(os.urandom(8192))
    proc = _status(home)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(home / "state.db") in lines[0] and "not a readable semalign state database" \
        in lines[0], proc.stderr[-2000:]


def test_the_gates_fail_closed_when_the_champions_record_cannot_be_read(registry, movielens):
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from semalign.data import make_split
    from semalign.flows.gates import run_gates

    s, reg = registry
    run = reg.client.create_run(reg.experiment_id)   # a champion run whose record (profile, evaluation) is gone
    split = make_split(movielens, seed=0)
    rng = np.random.default_rng(0)
    n = movielens.n_items
    sids = pd.DataFrame({"sid_0": rng.integers(0, 8, n), "sid_1": rng.integers(0, 8, n), "sid_dedup": 0,
                         "embedding": list(rng.standard_normal((n, 4)).astype(np.float32))})
    same = {"all": {"auc": 0.7, "gauc": 0.7, "n_events": 1000, "n_positive": 500}}
    even = {"auc": (0.0, -0.001, 0.001), "level": 0.95, "users": 100, "resamples": 200, "seed": 0}
    evaluation = {"challenger": same, "champion": same, "compared": {"events": 1000, "paired": {"all": even}}}
    out = run_gates(s, reg, {"version": "1", "run_id": run.info.run_id}, movielens, split,
                    SimpleNamespace(sids=sids, churn=None), evaluation, feats=None)
    assert not out.passed and out.gates[0]["gate"] == "champion record"
    assert "reference_profile.json of run" in out.summary and "cannot be read" in out.summary
