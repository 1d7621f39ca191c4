"""The refresh flow end to end on a small generic-folder shop: real Prefect, real MLflow registry (sqlite),
real Feast store, real Great Expectations suites. Promotion, the drift gate, rollback, the refresh lock, S3.
Crash safety and the other faults are in tests/faults."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import flipped_copy, free_port, wait_for_port
from conftest import run_cli as _cli


@pytest.fixture(scope="module")
def shop(refreshed):
    return refreshed["shop"]


def _settings(home):
    from semalign.config import Settings

    return Settings(home=home)


def test_refresh_trains_logs_and_serves_the_measured_specification(tmp_path, refreshed):
    """The champion is the model `semalign experiment` measures as the served variant (same RankerConfig,
    recorded in the MLflow run), and serving computes the user features training and evaluation used."""
    from dataclasses import asdict

    import numpy as np

    from semalign.data import load_dataset, settings_split
    from semalign.deploy.registry import Registry
    from semalign.deploy.scoring import RankerScorer
    from semalign.features import user_features
    from semalign.spec import ranker_config

    from conftest import SMALL_REFRESH
    from semalign.config import Settings

    s = Settings(home=refreshed["home"], **{k[len("SEMALIGN_"):].lower(): v for k, v in SMALL_REFRESH.items()})
    assert s.hist_len == int(SMALL_REFRESH["SEMALIGN_HIST_LEN"])  # the settings the run had
    reg = Registry(s)
    mv = reg.get_version(refreshed["first"]["model_version"])
    folder = reg.download_ranker(mv, tmp_path / "champion")
    trained = json.loads((folder / "ranker.json").read_text())["config"]
    spec = asdict(ranker_config(s))
    params = reg.client.get_run(refreshed["first"]["run_id"]).data.params
    assert {k: params[f"ranker.{k}"] for k in spec} == {k: str(v) for k, v in spec.items()}
    spec["hidden"] = list(spec["hidden"])
    assert trained == spec and trained["variant"] == s.ranker_variant

    ds = load_dataset(refreshed["shop"])
    split = settings_split(ds, s)
    users = ds.interactions.drop_duplicates("user_idx").sort_values("user_idx")
    train_users = users[np.isin(users["user_idx"], split.part("train")["user_idx"].unique())].head(50)
    scorer = RankerScorer(folder, s)
    served, _, known = scorer.user_rows(train_users["user_id"].tolist())
    assert known.all()
    expected = user_features(split, ds.n_users)[train_users["user_idx"].to_numpy()]
    np.testing.assert_allclose(served, expected, atol=1e-6)
    # the text-tower vector the ranker trained on beside the aligned one is the one the store serves it
    from semalign.flows.semantic_ids import tower_features

    assert trained["keep_raw_content"] and scorer.raw_dim > 0
    ids = ds.items["item_id"].tolist()[:20]
    _, found, _, raw = scorer.store.read_online(ids, scorer.codebook_version, scorer.levels, with_content=True)
    assert found.all()
    np.testing.assert_allclose(np.stack(raw), tower_features(s, ds).text[:20], rtol=1e-5, atol=1e-6)


def test_refresh_promotes_then_drift_is_blocked_then_promote_and_rollback(tmp_path, refreshed):
    import mlflow

    from semalign.deploy.registry import Registry
    from semalign.feature_repo.store import SemanticIdStore

    home, env, first, shop = refreshed["home"], refreshed["env"], refreshed["first"], refreshed["shop"]
    assert first["promoted"] and first["champion"] == first["model_version"]
    s = _settings(home)
    reg = Registry(s)
    st = reg.status()
    assert st["champion"]["codebook_version"] == first["codebook"]["version"] == st["current_codebook"]
    assert st["last_gate"]["passed"]

    # the champion loads with plain MLflow and scores (user, item) rows from the feature store
    mlflow.set_tracking_uri(s.resolved_tracking_uri())
    os.environ["SEMALIGN_HOME"] = str(home)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{s.model_name}@champion")
        scores = model.predict(pd.DataFrame({"user_id": ["u1", "u2", "nobody"], "item_id": ["sku-1", "sku-2", "sku-3"]}))
    finally:
        del os.environ["SEMALIGN_HOME"]
    assert len(scores) == 3 and ((scores > 0) & (scores < 1)).all()
    # the suites behind the gates are in a persistent GE context with Data Docs, linked from the run and report
    from semalign.deploy.report import build_report

    docs = first["data_docs"]
    assert docs.startswith("file://") and Path(docs[len("file://"):]).is_file()
    assert reg.client.get_run(first["run_id"]).data.tags["data_docs"] == docs
    assert docs in build_report(s, tmp_path / "report.html").read_text()
    assert (home / "gx" / "gx" / "expectations" / "input_interactions.json").exists()
    # the second registered model: the SID tokenizer of the champion's codebook version
    os.environ["SEMALIGN_HOME"] = str(home)
    try:
        tok = mlflow.pyfunc.load_model(f"models:/{reg.tokenizer_name}/1")
    finally:
        del os.environ["SEMALIGN_HOME"]
    got = tok.predict(pd.DataFrame({"item_id": ["sku-1", "sku-2"]}))
    want = SemanticIdStore(s).semantic_ids(["sku-1", "sku-2"])
    assert got.tolist() == ["-".join(str(int(v)) for v in r) for r in
                            want[["sid_0", "sid_1", "sid_2", "sid_dedup"]].to_numpy()]
    assert tok.metadata.metadata["semalign"]["codebook_version"] == first["codebook"]["version"]
    # the model says what it needs from the feature store
    needs = model.metadata.metadata["semalign"]
    assert needs["codebook_version"] == first["codebook"]["version"] and needs["users_version"].startswith("users-")
    assert needs["feast_project"] == s.feast_project and "SEMALIGN_HOME" in needs["feature_store"]

    def champion_scores():
        """What the champion serves a fixed set of requests (its codebook version, its user-feature snapshot)."""
        from semalign.deploy.registry import CHAMPION
        from semalign.deploy.scoring import RankerScorer

        reg_now = Registry(s)
        mv = reg_now.version_by_alias(CHAMPION)
        scorer = RankerScorer(reg_now.download_ranker(mv, tmp_path / f"champion-v{mv.version}"), s)
        users = [f"u{k}" for k in range(1, 9) for _ in range(5)]
        return scorer.score(users, [f"sku-{(k * 7) % 60 + 1}" for k in range(len(users))])

    served_before = champion_scores()

    # run metrics and artifacts are in the run
    run = reg.client.get_run(first["run_id"])
    assert "challenger_auc_all" in run.data.metrics and run.data.params["split"] == "cold-items"
    arts = {a.path for a in reg.client.list_artifacts(first["run_id"])}
    assert {"plots", "encoder", "codebook", "validation_report.json", "reference_profile.json"} <= arts

    store = SemanticIdStore(s)
    sids_before = store.semantic_ids([f"sku-{i}" for i in range(1, 40)])
    services_before = sorted(fs.name for fs in store.fs.list_feature_services())

    # unchanged input: nothing retrained, published or promoted
    again = json.loads(_cli("run", "--data", str(shop), "--json", env=env).stdout)
    assert again["ranker"]["reused"] and again["encoder"]["reused"] and again["codebook"]["reused"]
    assert not again["feature_store"]["published_now"] and not again["promoted"]
    assert again["model_version"] == first["model_version"]

    # drifted input: labels flipped, and the user join broken (user ids permuted across events: every user keeps
    # their activity, no user their history). Blocked by the gates; the champion and what it serves stay as they were
    drift = flipped_copy(shop, tmp_path / "drift", share=0.3)
    events = pd.read_csv(drift / "interactions.csv")
    events.assign(user_id=np.random.default_rng(0).permutation(events["user_id"].to_numpy())).to_csv(
        drift / "interactions.csv", index=False)
    proc = _cli("run", "--data", str(drift), "--json", env=env, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the gates blocked the promotion: its own exit code
    blocked = json.loads(proc.stdout)
    assert not blocked["verdict"]["passed"] and not blocked["promoted"]
    failed = [c["name"] for g in blocked["verdict"]["gates"] for c in g["checks"] if not c["passed"]]
    assert "label rate" in failed and "users recognised from their past" in failed
    recognised = next(c for g in blocked["verdict"]["gates"] for c in g["checks"] if c["name"].startswith("users rec"))
    assert abs(recognised["observed"] - 0.5) < 0.1      # the champion's users are strangers now
    quality = next(c for g in blocked["verdict"]["gates"] for c in g["checks"] if c["name"].startswith("AUC all:"))
    low, high = quality["interval"]
    assert low <= quality["observed"] <= high and f"[{low:+.4f}, {high:+.4f}]" in quality["expected"]
    assert blocked["champion"] == first["model_version"]
    # the champion is judged only on test events it never trained or validated on: the same events with other
    # labels split the same way, so that is every test event here (the unit tests cover an overlapping window)
    cmp = blocked["evaluation"]["compared"]
    assert cmp["excludes_champion_training"] and cmp["events"] == cmp["test_events"] > 200
    assert cmp["challenger"]["all"]["n_events"] == blocked["evaluation"]["champion"]["all"]["n_events"] == cmp["events"]
    store2 = SemanticIdStore(s)
    assert store2.current_version() == first["codebook"]["version"]
    pd.testing.assert_frame_equal(store2.semantic_ids([f"sku-{i}" for i in range(1, 40)]), sids_before)
    assert sorted(fs.name for fs in store2.fs.list_feature_services()) == services_before
    # ... and so does every score it serves: the blocked refresh wrote its user features as a new snapshot
    np.testing.assert_array_equal(champion_scores(), served_before)
    status = json.loads(_cli("status", "--json", env=env).stdout)
    assert status["champion"]["version"] == first["model_version"]
    assert not status["last_gate"]["passed"] and "label rate" in status["last_gate"]["summary"]

    # promotion and rollback are single audited alias moves
    v2 = blocked["model_version"]
    moved = json.loads(_cli("promote", v2, "--reason", "test override", "--json", env=env).stdout)["promote"]
    assert moved["moved"] and moved["champion"] == v2 and moved["previous"] == first["model_version"]
    assert SemanticIdStore(s).current_version() == blocked["codebook"]["version"]
    back = json.loads(_cli("rollback", "--json", env=env).stdout)["rollback"]
    assert back["champion"] == first["model_version"]
    status = json.loads(_cli("status", "--json", env=env).stdout)
    assert status["champion"]["version"] == first["model_version"]
    actions = [(h["action"], h["to_value"]) for h in status["history"]]
    assert ("rollback", first["model_version"]) in actions and ("promote", v2) in actions
    assert SemanticIdStore(s).current_version() == first["codebook"]["version"]
    np.testing.assert_array_equal(champion_scores(), served_before)   # promote + rollback: the same scores


def test_two_refreshes_at_once_one_fails_cleanly(tmp_path):
    from semalign.flows.errors import RefreshLockedError
    from semalign.flows.lock import refresh_lock

    s = _settings(tmp_path / "home")
    with refresh_lock(s):
        with pytest.raises(RefreshLockedError, match="another refresh of project"):
            with refresh_lock(s):
                pass
    proc = _cli("run", "--data", str(tmp_path / "nothing-here"), env={"SEMALIGN_HOME": str(tmp_path / "home")},
                check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr



@pytest.fixture
def moto_s3(tmp_path):
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    creds = {"AWS_ACCESS_KEY_ID": "semalign-test-key", "AWS_SECRET_ACCESS_KEY": "semalign-test-secret-do-not-log",
             "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": url}
    yield url, creds
    proc.terminate()
    proc.wait(10)


def test_artifacts_go_to_an_s3_compatible_server(tmp_path, shop, moto_s3):
    import boto3

    url, creds = moto_s3
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    s3.create_bucket(Bucket="semalign-artifacts")
    home = tmp_path / "home"
    env = {"SEMALIGN_HOME": str(home), "SEMALIGN_ARTIFACT_URI": "s3://semalign-artifacts/mlflow", **creds}
    proc = _cli("run", "--data", str(shop), "--json", env=env)
    res = json.loads(proc.stdout)
    assert res["promoted"]
    logs = proc.stdout + proc.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="semalign-artifacts").get("Contents", [])]
    assert any(k.endswith("ranker.safetensors") for k in keys)
    assert any(k.endswith("validation_report.json") for k in keys)
    assert not (home / "mlartifacts").exists()
    # the champion loads from S3 in a fresh process with plain MLflow
    code = ("import mlflow, pandas as pd; mlflow.set_tracking_uri(%r); "
            "m = mlflow.pyfunc.load_model('models:/semalign-ranker@champion'); "
            "print(float(m.predict(pd.DataFrame({'user_id': ['u1'], 'item_id': ['sku-1']})).iloc[0]))"
            % f"sqlite:///{home / 'mlflow.db'}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0 < float(out.stdout.strip().splitlines()[-1]) < 1
    # credentials never reach MLflow params, tags or artifacts
    from semalign.deploy.registry import Registry

    reg = Registry(_settings(home))
    run = reg.client.get_run(res["run_id"])
    blob = logs + json.dumps({**run.data.params, **run.data.tags})
    for k in keys:
        if k.endswith(".json") or k.endswith(".yaml") or k.endswith("MLmodel"):
            blob += s3.get_object(Bucket="semalign-artifacts", Key=k)["Body"].read().decode(errors="replace")
    assert creds["AWS_SECRET_ACCESS_KEY"] not in blob and creds["AWS_ACCESS_KEY_ID"] not in blob
    # nor anything semalign writes under its home (rendered Feast repo, state, run folders)
    for f in home.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            data = f.read_bytes()
            assert creds["AWS_SECRET_ACCESS_KEY"].encode() not in data, f


def test_a_normal_run_prints_no_library_log_lines_or_warnings(refreshed):
    """`semalign run` shows its own progress and result; no INFO / WARNING lines or warnings from the libraries
    it drives (Feast, MLflow, Prefect, transformers, GE)."""
    noise = [line for line in refreshed["stderr"].splitlines()
             if any(k in line for k in (" INFO ", "INFO:", "WARNING", "Warning:", "warnings.warn", "UserWarning",
                                        "FutureWarning", "DeprecationWarning", "Successfully registered",
                                        "Created version"))]
    assert not noise, "\n".join(noise[:20])
