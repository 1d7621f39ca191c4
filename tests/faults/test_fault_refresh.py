"""Real faults against a production-shaped deployment on loopback: Redis online store, an `mlflow server`
registry, a `prefect server`, SEMALIGN_HOME on its own size-limited filesystem. The refresh is SIGKILLed at every stage boundary,
Redis and MLflow are stopped under it, its disk fills up and turns read-only; the scoring service loses Redis
and serves while a refresh runs. After every fault: the champion, its codebook version's online SIDs and the
audited registry moves are exactly as before, nothing half-written is readable, and the next run completes.

The tests run in order on one deployment (each refresh costs seconds to a minute on 2 cores)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import flipped_copy, free_port, wait_for_port, write_generic
from faultkit import (Load, MlflowServer, Paused, PrefectServer, RedisServer, cli_env, get,
                      mount_tmpfs, nothing_half_written, post, remount, run, snapshot, umount)

# every stage boundary of the refresh flow, in order, then the two steps of a promotion
STAGE_KILLS = ["refresh.after_ingest", "refresh.after_towers", "refresh.after_encoder", "refresh.after_codebook",
               "refresh.after_publish", "refresh.after_users", "refresh.after_ranker", "refresh.after_evaluate",
               "refresh.before_promote", "refresh.after_feature_service"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, movielens):
    root = tmp_path_factory.mktemp("faults")
    shop = write_generic(root / "shop", movielens, n_items=300)
    redis = RedisServer(root / "redis")
    redis.start()
    mlflow = MlflowServer(root / "mlflow")
    mlflow.start()
    prefect = PrefectServer(root / "prefect")
    prefect.start()
    home = root / "home"
    on_tmpfs = mount_tmpfs(home, 512)
    env = {"SEMALIGN_HOME": str(home), "SEMALIGN_FEAST_ONLINE": "redis", "SEMALIGN_REDIS_URL": redis.url,
           "SEMALIGN_MLFLOW_TRACKING_URI": mlflow.url, "SEMALIGN_FEAST_PROJECT": "faults",
           "PREFECT_API_URL": prefect.api}
    first = run(["run", "--data", str(shop), "--json"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    items = pd.read_csv(shop / "items.csv")["item_id"].astype(str).tolist()
    yield {"root": root, "shop": shop, "home": home, "env": env, "redis": redis, "mlflow": mlflow,
           "items": items, "on_tmpfs": on_tmpfs, "first": json.loads(first.stdout)}
    redis.stop()
    mlflow.stop()
    prefect.stop()
    if on_tmpfs:
        umount(home)


def test_sigkill_at_every_stage_boundary_changes_nothing_and_the_next_run_completes(deployment, tmp_path):
    d = deployment
    env, items = d["env"], d["items"]
    before = snapshot(env, items)
    assert before["champion"] == d["first"]["champion"] and before["sids"] is not None
    data = flipped_copy(d["shop"], tmp_path / "changed", share=0.02, seed=1)
    for point in STAGE_KILLS:
        paused = Paused(data, env, point, tmp_path)
        if point == STAGE_KILLS[0]:  # a second refresh while one runs: refused cleanly by the lock
            second = run(["run", "--data", str(data), "--json"], env)
            assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert "another refresh of project 'faults' is running" in second.stderr
        paused.kill()
        after = snapshot(env, items)
        assert after == before, f"state changed after a SIGKILL at {point}"
        nothing_half_written(d["home"])

    # killed between the alias move and the store's pointer: the champion is the new version, whose
    # codebook is published; `status` names the mismatch and the next run finishes the promotion
    Paused(data, env, "registry.promote.after_alias", tmp_path).kill()
    mid = snapshot(env, items)
    assert mid["champion"] != before["champion"] and mid["current_codebook"] == before["current_codebook"]
    assert "semalign promote" in mid["warning"]
    done = run(["run", "--data", str(data), "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    end = snapshot(env, items)
    assert end["champion"] == res["champion"] == mid["champion"] and end["warning"] is None
    assert end["current_codebook"] == end["champion_codebook"] == res["codebook"]["version"]
    assert end["moves"][0] == ("promote", before["champion"], end["champion"])
    # the old champion's codebook version still serves its items (nothing lost)
    from faultkit import settings_from
    from semalign.feature_repo.store import SemanticIdStore

    old = SemanticIdStore(settings_from(env)).semantic_ids(items, version=before["champion_codebook"])
    assert old.to_dict("list") == before["sids"]


def _bodies(items: list[str], users: list[str], n: int = 100) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"user_id": u, "candidates": [{"item_id": i} for i in rng.choice(items, n, replace=False)]}
            for u in users]


@pytest.fixture(scope="module")
def service(deployment):
    d = deployment
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port),
                             "--check-interval", "1"], env=cli_env(d["env"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_port(port, 120)
    url = f"http://127.0.0.1:{port}"
    ev = pd.read_csv(d["shop"] / "interactions.csv")
    users = ev["user_id"].astype(str).drop_duplicates().head(20).tolist()
    yield {"url": url, "proc": proc, "bodies": _bodies(d["items"], users)}
    proc.terminate()
    proc.wait(30)


def test_redis_stopped_while_serving_gives_503_and_unhealthy_then_recovers(deployment, service):
    d, url = deployment, service["url"]
    body = service["bodies"][0]
    code, ok = post(f"{url}/score", body)
    assert code == 200 and get(f"{url}/health")[0] == 200
    d["redis"].stop()
    try:
        t = time.perf_counter()
        code, err = post(f"{url}/score", body, timeout=60)   # bounded: redis-py's 3 retries, 1 s socket timeouts
        took = time.perf_counter() - t
        assert code == 503 and "unreachable" in err["detail"], (code, err)
        hc, health = get(f"{url}/health", timeout=60)
        assert hc == 503 and health["status"] == "unhealthy" and "unreachable" in health["error"]
        print(f"redis down: /score answered 503 after {took:.2f} s")
    finally:
        d["redis"].start()
    deadline = time.time() + 60
    while get(f"{url}/health")[0] != 200 and time.time() < deadline:
        time.sleep(0.5)
    code, again = post(f"{url}/score", body)
    assert code == 200
    assert {r["item_id"]: (r["score"], r["sid"]) for r in again["items"]} == \
        {r["item_id"]: (r["score"], r["sid"]) for r in ok["items"]}

    # hung instead of stopped: the connection is accepted but nothing answers; socket timeouts bound the wait
    d["redis"].hang(True)
    try:
        t = time.perf_counter()
        code, err = post(f"{url}/score", body, timeout=90)
        took = time.perf_counter() - t
        assert code == 503 and "unreachable" in err["detail"], (code, err)
        print(f"redis hung: /score answered 503 after {took:.2f} s")
    finally:
        d["redis"].hang(False)
    deadline = time.time() + 60
    while get(f"{url}/health")[0] != 200 and time.time() < deadline:
        time.sleep(0.5)
    assert post(f"{url}/score", body)[0] == 200


def test_serving_under_load_while_a_refresh_runs_has_no_errors(deployment, service, tmp_path):
    d, url = deployment, service["url"]
    before = get(f"{url}/version")[1]["model_version"]
    data = flipped_copy(d["shop"], tmp_path / "next", share=0.03, seed=2)
    load = Load(url, service["bodies"], clients=4).start()
    time.sleep(5)
    t_refresh = time.perf_counter()
    res = run(["run", "--data", str(data), "--json"], d["env"])
    t_done = time.perf_counter()
    assert res.returncode == 0, res.stderr[-3000:]
    new = json.loads(res.stdout)["champion"]
    deadline = time.time() + 30
    while get(f"{url}/version")[1]["model_version"] != new and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    results = load.stop()
    statuses = [r[2] for r in results]
    assert len(results) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert {r[3] for r in results} <= {before, new}
    assert results[-1][3] == new   # the promoted champion was swapped in without a restart
    lat = np.array([r[1] for r in results])
    during = np.array([r[0] >= t_refresh and r[0] <= t_done for r in results])
    print(f"load: {len(lat)} requests, p99 outside refresh {np.percentile(lat[~during], 99) * 1e3:.0f} ms, "
          f"during refresh {np.percentile(lat[during], 99) * 1e3:.0f} ms")


def test_redis_stopped_during_publish_fails_the_refresh_cleanly(deployment, tmp_path):
    d = deployment
    env, items = d["env"], d["items"]
    before = snapshot(env, items)
    data = flipped_copy(d["shop"], tmp_path / "pub", share=0.04, seed=3)
    paused = Paused(data, env, "refresh.after_codebook", tmp_path)
    d["redis"].stop()
    try:
        rc, out, err = paused.resume()
    finally:
        d["redis"].start()
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "stage 'publish'" in err and "unreachable" in err and "nothing was promoted" in err
    assert snapshot(env, items) == before
    nxt = run(["run", "--data", str(data), "--json"], env)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    res = json.loads(nxt.stdout)
    assert res["feature_store"]["published_now"] and res["promoted"]


def test_mlflow_unreachable_fails_before_promotion(deployment, service, tmp_path):
    d = deployment
    env, items = d["env"], d["items"]
    before = snapshot(env, items)
    data = flipped_copy(d["shop"], tmp_path / "mlf", share=0.02, seed=4)
    paused = Paused(data, env, "refresh.after_evaluate", tmp_path)
    d["mlflow"].stop()
    try:
        rc, out, err = paused.resume()
        # the scoring service keeps serving the champion it loaded; its alias checks report the outage
        time.sleep(2)
        assert post(f"{service['url']}/score", service["bodies"][0])[0] == 200
        hc, health = get(f"{service['url']}/health")
        assert hc == 200 and health["last_check_error"], health
    finally:
        d["mlflow"].start()
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "stage 'log to MLflow'" in err and "nothing was promoted" in err
    assert snapshot(env, items) == before   # read through the restarted server: nothing moved
    # (that the next run completes after a failed stage is shown by the Redis and disk-full cases)


def test_state_database_unreachable_fails_at_once(deployment):
    d = deployment
    before = snapshot(d["env"], d["items"])
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/semalign"
    res = run(["run", "--data", str(d["shop"]), "--json"], {**d["env"], "SEMALIGN_STATE_URL": dead})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "refresh lock" in res.stderr and "nothing was promoted" in res.stderr
    assert snapshot(d["env"], d["items"]) == before


def test_disk_full_then_read_only_home(deployment, tmp_path):
    d = deployment
    if not d["on_tmpfs"]:
        pytest.skip("needs root to mount a size-limited tmpfs for SEMALIGN_HOME")
    env, items, home = d["env"], d["items"], d["home"]
    before = snapshot(env, items)
    data = flipped_copy(d["shop"], tmp_path / "full", share=0.02, seed=5)
    st = os.statvfs(home)
    ballast = home / "ballast.bin"
    free = st.f_bavail * st.f_frsize
    with ballast.open("wb") as f:   # leave 600 KiB: the run starts, then a model or feature write fails
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = free - 600 * 1024
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    try:
        res = run(["run", "--data", str(data), "--json"], env)
    finally:
        ballast.unlink()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "No space left on device" in res.stderr or "disk is full" in res.stderr, res.stderr[-2000:]
    print("disk full:", res.stderr.strip().splitlines()[-1][:300])
    assert snapshot(env, items) == before
    nothing_half_written(home)
    left = [p for sub in ("encoders", "codebooks", "rankers") for p in (home / sub).glob(".*.tmp-*")]
    print("disk full left temporaries:", [p.name for p in left])

    # a read-only filesystem (this deployment's own home stays mounted read-write: its databases are open)
    ro_root = tmp_path / "ro"
    assert mount_tmpfs(ro_root, 1)
    try:
        remount(ro_root, "ro")
        for args in (["run", "--data", str(data), "--json"], ["items", "add", str(d["shop"] / "items.csv")]):
            ro = run(args, {**env, "SEMALIGN_HOME": str(ro_root / "home")})
            assert ro.returncode == 1 and "Traceback" not in ro.stderr, ro.stderr[-2000:]
            assert "is not writable: Read-only file system" in ro.stderr and "nothing was changed" in ro.stderr
    finally:
        umount(ro_root)
    nxt = run(["run", "--data", str(data), "--json"], env)
    assert nxt.returncode == 0 and json.loads(nxt.stdout)["promoted"], nxt.stderr[-3000:]
    assert not any(p.exists() for p in left)   # the failed run's temporaries went with the next run
