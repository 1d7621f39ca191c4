"""What `semalign status` and the serving side say when the state they read is odd (issue 32, item 5): a promotion
reason that looks like markup, a champion alias naming a version that is gone, a state database that is not one.
Real MLflow and state databases, built by MLflow and semalign themselves."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from semalign.config import Settings

REASON = "moved by hand [/x] after [bold]the[/bold] outage"


def _status(home, *args):
    return subprocess.run([sys.executable, "-m", "semalign.cli", "status", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SEMALIGN_HOME": str(home)})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry with versions 1 and 2 (no artifacts: nothing here loads them), v1 promoted with REASON."""
    from semalign.deploy.registry import Registry

    s = Settings(home=tmp_path_factory.mktemp("diagnosis") / "home")
    reg = Registry(s)
    c = reg.client
    c.create_registered_model(s.model_name)
    run = c.create_run(reg.experiment_id)
    for v in (1, 2):
        c.create_model_version(s.model_name, source=f"{reg.artifact_uri}/m{v}", run_id=run.info.run_id)
    reg.promote("1", reason=REASON)
    return s, reg


def test_a_reason_that_looks_like_markup_is_printed_as_written(registry):
    s, _ = registry
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
