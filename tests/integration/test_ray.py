"""The refresh on a real Ray cluster (a head on loopback, started here) computes what the in-process refresh
computes: the same encoder and codebook versions, the same SIDs and aligned vectors for every item, the same ranker
weights bit for bit. The in-process side is the session's `refreshed` shop (the same data and settings)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, run_cli

# no usage reports; a head on loopback keeps Ray's own traffic on loopback (Ray otherwise swaps in the host's address)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs and no dashboard, in its own process group so the
    finalizer stops exactly what it started (not every Ray on the machine, as `ray stop` would)."""
    port, client_port = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # Ray's unix socket paths must stay short
    log = open(temp / "head.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--ray-client-server-port", str(client_port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                            start_new_session=True)
    deadline = time.time() + 90
    while b"Ray runtime started" not in (temp / "head.log").read_bytes():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("ray head did not start: " + (temp / "head.log").read_text()[-3000:])
        time.sleep(0.3)
    yield {"address": f"127.0.0.1:{port}", "temp": temp}
    # the head's group, and the workers Ray started in sessions of their own: every process holding a file of this
    # cluster's own temp dir open (its logs) was started by this cluster
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in {proc.pid, *_holding(temp)}:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if not _holding(temp):
            break
    log.close()
    assert not _holding(temp), "ray processes outlived the fixture"
    shutil.rmtree(temp, ignore_errors=True)  # the session's logs and sockets


def _holding(folder: Path) -> set[int]:
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(os.readlink(fd)).startswith(str(folder)) for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:  # gone, or not ours to look at
            continue
    return pids - {os.getpid()}


def test_refresh_on_ray_matches_the_in_process_refresh(tmp_path, refreshed, ray_head):
    import torch
    from safetensors.torch import load_file

    from semalign.config import Settings
    from semalign.flows.semantic_ids import load_sids

    home = tmp_path / "home"
    proc = run_cli("run", "--data", str(refreshed["shop"]), "--ray", ray_head["address"], "--json",
                   env={"SEMALIGN_HOME": str(home), **RAY_ENV})
    out, first = json.loads(proc.stdout), refreshed["first"]

    # the heavy stages ran on the cluster, each over the whole catalogue or training window
    ray = out["ray"]
    assert ray["address"] == ray_head["address"] and ray["nodes"] == 1 and ray["device"] == "cpu"
    jobs = {j["job"]: j for j in ray["jobs"]}
    assert list(jobs) == ["text tower", "encoder", "ranker"]
    assert jobs["text tower"]["items"] == jobs["encoder"]["items"] == out["data"]["items"] == 300
    assert jobs["ranker"]["workers"] == 1 and jobs["ranker"]["samples"] > 1000
    train_logs = list((ray_head["temp"] / "session_latest" / "logs" / "train").glob("ray-train-app-worker-*.log"))
    assert train_logs, "no Ray Train worker ran on the cluster"

    # ... and computed exactly what the in-process refresh computed
    assert out["encoder"]["version"] == first["encoder"]["version"]
    assert out["codebook"]["version"] == first["codebook"]["version"]
    assert out["ranker"]["input_key"] == first["ranker"]["input_key"]
    version = out["codebook"]["version"]
    ours, theirs = load_sids(Settings(home=home), version), load_sids(Settings(home=refreshed["home"]), version)
    assert len(ours) == 300
    sid_cols = [c for c in ours.columns if c.startswith("sid_")]
    assert ours[["item_id", *sid_cols]].equals(theirs[["item_id", *sid_cols]])
    np.testing.assert_array_equal(np.stack(ours["embedding"]), np.stack(theirs["embedding"]))
    key = out["ranker"]["input_key"]
    w_ray = load_file(str(home / "rankers" / key / "ranker.safetensors"))
    w_local = load_file(str(refreshed["home"] / "rankers" / key / "ranker.safetensors"))
    assert w_ray.keys() == w_local.keys()
    different = [k for k in w_ray if not torch.equal(w_ray[k], w_local[k])]
    assert not different, f"ranker tensors differ from the in-process ones: {different}"
    assert out["evaluation"]["challenger"] == first["evaluation"]["challenger"]
    assert out["promoted"] == first["promoted"]
    assert not list((home / "ray" / "train").glob("ranker-*"))  # Ray Train's bookkeeping is not left behind


def test_an_unreachable_ray_address_fails_before_anything_is_published(tmp_path, refreshed):
    port = free_port()  # nothing listens there
    home = tmp_path / "home"
    t0 = time.time()
    proc = run_cli("run", "--data", str(refreshed["shop"]), "--ray", f"127.0.0.1:{port}",
                   env={"SEMALIGN_HOME": str(home), **RAY_ENV}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"127.0.0.1:{port}" in proc.stderr and "unreachable" in proc.stderr
    assert "nothing was published" in proc.stderr
    assert not (home / "codebooks").exists() and not (home / "encoders").exists()
    assert time.time() - t0 < 120  # a named error, not Ray's endless retry


TEXT_ROWS = """
import json, sys
import numpy as np
import torch
from semalign.config import Settings
from semalign.flows import ray_engine
from semalign.models.towers import TextTower, default_text_batch, length_batches
torch.set_num_threads(1)
rng = np.random.default_rng(0)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 40, 700)]
s = Settings(ray_address=sys.argv[1], ray_actors=1, ray_cpus_per_worker=1, device="cpu")
on_ray = ray_engine.text_vectors(s, texts)
local = TextTower(s.resolved_text_model(), device="cpu").encode(texts)
print(json.dumps({"equal": bool(np.array_equal(on_ray, local)), "rows": ray_engine.jobs()[-1]["rows"],
                  "batches": len(length_batches(texts, default_text_batch("cpu")))}))
"""


def test_text_tower_on_ray_sends_runs_of_batches_per_row_and_keeps_every_bit(ray_head):
    """Ray Data's cost per row made one 64-text batch a row slow (193 s for 1M texts on an H200): a row now carries
    consecutive longest-first batches, which the actor's tower cuts back into the same batches, so every vector is
    still the in-process vector, bit for bit."""
    p = subprocess.run([sys.executable, "-c", TEXT_ROWS, ray_head["address"]], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **RAY_ENV}, cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["batches"] == 11 and out["rows"] == 6  # 2 batches a row: 11 // (4 rows x 1 actor)
    assert out["equal"]
