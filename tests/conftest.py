import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = Path(os.environ.get("SEMALIGN_TEST_MOVIELENS", ROOT.parent / "shared" / "data" / "movielens-100k"))


@pytest.fixture(scope="session")
def movielens_path() -> Path:
    if not (MOVIELENS / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {MOVIELENS} (set SEMALIGN_TEST_MOVIELENS)")
    return MOVIELENS


@pytest.fixture(scope="session")
def movielens(movielens_path):
    from semalign.data import load_dataset

    return load_dataset(movielens_path)


def write_generic(folder: Path, ds, n_items: int = 300, images: bool = False, fmt: str = "csv") -> Path:
    """A generic contract folder from MovieLens with a different id scheme (strings) and ISO timestamps."""
    folder.mkdir(parents=True, exist_ok=True)
    items = ds.items.iloc[:n_items]
    keep = set(items["item_id"])
    inter = ds.interactions[ds.interactions["item_id"].isin(keep)]
    it = pd.DataFrame({"item_id": "sku-" + items["item_id"], "text": items["text"], "category": items["genres"]})
    ev = pd.DataFrame({"user_id": "u" + inter["user_id"], "item_id": "sku-" + inter["item_id"],
                       "timestamp": inter["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"), "label": inter["label"]})
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for iid, p in zip(items["item_id"], items["image_path"]):
            if p:
                (folder / "images" / f"sku-{iid}.jpg").write_bytes(Path(p).read_bytes())
    if fmt == "csv":
        it.to_csv(folder / "items.csv", index=False)
        ev.to_csv(folder / "interactions.csv", index=False)
    else:
        it.to_parquet(folder / "items.parquet", index=False)
        ev.to_parquet(folder / "interactions.parquet", index=False)
    return folder


def flipped_copy(src: Path, dest: Path, share: float, seed: int = 0) -> Path:
    """A copy of a generic shop folder with the labels of `share` of the events flipped: a small share is a
    legitimate change (every stage retrains), a large one moves the label rate as broken tracking would."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "items.csv").write_bytes((src / "items.csv").read_bytes())
    ev = pd.read_csv(src / "interactions.csv")
    idx = np.random.default_rng(seed).choice(len(ev), int(share * len(ev)), replace=False)
    ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
    ev.to_csv(dest / "interactions.csv", index=False)
    return dest


@pytest.fixture
def clustered():
    """Synthetic embeddings with cluster structure (like real item embeddings, unlike isotropic noise)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 32)).astype(np.float32)
    labels = rng.integers(0, 40, 4000)
    x = centers[labels] + 0.3 * rng.standard_normal((4000, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# a refresh sized for tests: most of a test refresh's CPU time is the ranker, which scales with the history length
SMALL_REFRESH = {"SEMALIGN_ENCODER_EPOCHS": "2", "SEMALIGN_RANKER_EPOCHS": "2", "SEMALIGN_HIST_LEN": "20"}

_PREFECT: dict = {}


def prefect_api() -> str:
    """One `prefect server` on loopback for the session's `semalign` processes, started on first use: each
    process would otherwise start its own ephemeral server (7-15 s a process on 2 cores). A test of the embedded
    default passes PREFECT_API_URL="" to get the ephemeral one."""
    import atexit
    import subprocess
    import sys
    import tempfile
    import urllib.request

    if "api" in _PREFECT:
        return _PREFECT["api"]
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="semalign-test-prefect-"))
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "",
                                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

    def stop():
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    atexit.register(stop)
    api = f"http://127.0.0.1:{port}/api"
    import time

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(api + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("prefect server did not start: " + (home / "server.log").read_text()[-2000:])
            time.sleep(0.3)
    _PREFECT["api"] = api
    return api


def run_cli(*args, env=None, check=True, timeout=900):
    import subprocess
    import sys

    env = {**os.environ, **SMALL_REFRESH, **(env or {})}
    if "PREFECT_API_URL" not in env:
        env["PREFECT_API_URL"] = prefect_api()
    proc = subprocess.run([sys.executable, "-m", "semalign.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"semalign {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def refreshed(tmp_path_factory, movielens):
    """A small shop after its first `semalign run`: one champion. Tests that continue from here run in order
    on the same home (each refresh costs most of a minute on 2 cores)."""
    import json

    root = tmp_path_factory.mktemp("refreshed")
    shop = write_generic(root / "shop", movielens, n_items=300)
    home = root / "home"
    env = {"SEMALIGN_HOME": str(home)}
    # the embedded default, as `make run` runs it: an ephemeral Prefect server in the process
    proc = run_cli("run", "--data", str(shop), "--json", env={**env, "PREFECT_API_URL": ""})
    return {"root": root, "shop": shop, "home": home, "env": env, "first": json.loads(proc.stdout),
            "stderr": proc.stderr}


def _files_using_refreshed(root: Path) -> set[str]:
    """Test files (paths as xdist names them) with a test or fixture that takes the `refreshed` home."""
    import ast

    found = set()
    for path in sorted((root / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "refreshed" in [a.arg for a in n.args.args]
               for n in ast.walk(tree)):
            found.add(path.relative_to(root).as_posix())
    return found


def pytest_xdist_make_scheduler(config, log):
    """`make test` (-n ... --dist loadfile): a file's tests stay together in one process, except that the files
    using the session's `refreshed` home are one work unit, so one process refreshes once for all of them (each
    process that got one of those files refreshed on its own: a minute of CPU on 2 cores each time), and the
    serving tests find the extra model versions the refresh tests leave behind."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    shared = _files_using_refreshed(Path(str(config.rootpath)))

    class SharedRefreshScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "refreshed" if scope in shared else scope

    return SharedRefreshScheduling(config, log)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
