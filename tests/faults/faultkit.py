"""Real faults for the fault-injection suite: private Redis and MLflow servers that a test can stop and start,
a refresh paused at a named checkpoint (then killed, or let go after breaking something under it), a tmpfs
home that can be filled or made read-only, the state that must survive, and a loopback load generator."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import SMALL_REFRESH, free_port, wait_for_port

# gates wide open: these tests are about faults, and every refresh on changed input must reach promotion
OPEN_GATES = {"SEMALIGN_GATE_AUC_TOLERANCE": "1", "SEMALIGN_GATE_COLD_AUC_TOLERANCE": "1",
              "SEMALIGN_GATE_MAX_LEVEL0_CHURN": "1", "SEMALIGN_DRIFT_SID_KL": "100",
              "SEMALIGN_DRIFT_POPULARITY_KL": "100"}


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


class RedisServer:
    """A private redis-server on a free loopback port that keeps its data across a stop (append-only file)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 30)

    def hang(self, on: bool) -> None:
        """SIGSTOP / SIGCONT: the server keeps its socket open but answers nothing (a hung Redis)."""
        self.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(self.port), "shutdown"],
                           capture_output=True, timeout=30)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HttpServer:
    """A server process on a free loopback port, in its own session (stopping it stops its workers too),
    up once `health_path` answers."""

    health_path = "/health"
    name = "server"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict]:
        raise NotImplementedError

    def start(self) -> None:
        argv, env = self.command()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, **env})
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + self.health_path, timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{self.name} did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class MlflowServer(HttpServer):
    """`mlflow server` on loopback: sqlite backend and artifact folder outside SEMALIGN_HOME (another machine,
    as in production). Stopping it is the 'MLflow backend unreachable' fault."""

    name = "mlflow server"

    def command(self):
        return ([_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                 "--default-artifact-root", (self.folder / "artifacts").as_uri()],
                {"MLFLOW_DISABLE_TELEMETRY": "true"})


class PrefectServer(HttpServer):
    """`prefect server start` on loopback, so the runs under test report to a real Prefect API (and do not
    each start an ephemeral one)."""

    name = "prefect server"
    health_path = "/api/health"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def command(self):
        return ([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                {"PREFECT_HOME": str(self.folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""})


def settings_from(env: dict):
    """The Settings a `semalign` process sees with `env` (pydantic reads SEMALIGN_* the same way)."""
    from semalign.config import Settings

    fields = {k[len("SEMALIGN_"):].lower(): v for k, v in env.items() if k.startswith("SEMALIGN_")}
    return Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})


def cli_env(env: dict) -> dict:
    return {**os.environ, **SMALL_REFRESH, **OPEN_GATES, **env}


def run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semalign.cli", *args], capture_output=True, text=True,
                          env=cli_env(env), timeout=timeout, start_new_session=True)


class Paused:
    """`semalign run` stopped at a checkpoint: kill it there, or let it go on after breaking something."""

    def __init__(self, data: Path, env: dict, point: str, workdir: Path):
        self.mark = Path(workdir) / f"mark-{point}-{time.time_ns()}"
        self.point = point
        self.out = Path(workdir) / f"{self.mark.name}.out"
        self.err = Path(workdir) / f"{self.mark.name}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semalign.cli", "run", "--data", str(data), "--json"],
            env={**cli_env(env), "SEMALIGN_PAUSE_AT": point, "SEMALIGN_PAUSE_MARK": str(self.mark)},
            stdout=self.out.open("w"), stderr=self.err.open("w"), start_new_session=True)
        deadline = time.time() + 600
        while not self.mark.exists() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if not self.mark.exists():
            self.kill()
            raise AssertionError(f"the refresh never reached {point} (rc={self.proc.returncode}):\n"
                                 f"{self.err.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the run and everything it started (its ephemeral Prefect server), as a machine crash."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def resume(self, timeout: float = 600) -> tuple[int, str, str]:
        self.mark.unlink()
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        return self.proc.returncode, self.out.read_text(), self.err.read_text()


def snapshot(env: dict, items: list[str]) -> dict:
    """What must survive any fault: the champion and its lineage, the audited alias moves, the store's current
    codebook, and every item's online SID under the champion's codebook version."""
    from semalign.deploy.registry import Registry
    from semalign.feature_repo.store import SemanticIdStore

    s = settings_from(env)
    reg = Registry(s)
    st = reg.status()
    champ = st["champion"] or {}
    moves = [(h["action"], h["from_value"], h["to_value"]) for h in reg.history(actions=("promote", "rollback"))]
    sids = None
    if champ.get("codebook_version"):
        sids = SemanticIdStore(s).semantic_ids(items, version=champ["codebook_version"]).to_dict("list")
    return {"champion": champ.get("version"), "champion_codebook": champ.get("codebook_version"),
            "champion_input": champ.get("data_hash"), "current_codebook": st["current_codebook"],
            "moves": moves, "sids": sids, "warning": st.get("warning")}


def nothing_half_written(home: Path) -> list[str]:
    """Every encoder, codebook and ranker folder in SEMALIGN_HOME loads (in-progress ones are dot-named
    temporaries that nothing reads). Returns the folders checked."""
    from semalign.models.encoder import load_encoder
    from semalign.models.codebook import Codebook

    checked = []
    for folder in sorted((home / "codebooks").glob("[!.]*")):
        if folder.is_dir() and folder.name != "latest":
            Codebook.load(folder)
            checked.append(str(folder))
    for folder in sorted((home / "encoders").glob("[!.]*")):
        if folder.is_dir() and folder.name != "latest":
            load_encoder(folder)
            checked.append(str(folder))
    for folder in sorted((home / "rankers").glob("[!.]*")):
        if folder.is_dir():
            meta = json.loads((folder / "ranker.json").read_text())
            assert (folder / "ranker.safetensors").stat().st_size > 0 and meta.get("input_key")
            checked.append(str(folder))
    return checked


class Load:
    """Bounded concurrent loopback load on /score: `clients` threads, each one request at a time."""

    def __init__(self, url: str, bodies: list[dict], clients: int = 4, timeout: float = 60):
        self.url, self.bodies, self.clients, self.timeout = url, bodies, clients, timeout
        self.results: list[tuple[float, float, int, str | None]] = []   # (start, latency s, status, model version)
        self._stop = threading.Event()
        self._threads = []
        self._lock = threading.Lock()

    def _client(self, k: int) -> None:
        j = k
        while not self._stop.is_set():
            body = json.dumps(self.bodies[j % len(self.bodies)]).encode()
            j += self.clients
            req = urllib.request.Request(f"{self.url}/score", data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    out = json.loads(r.read())
                    status, version = r.status, out["model_version"]
                    assert len(out["items"]) == len(self.bodies[(j - self.clients) % len(self.bodies)]["candidates"])
            except urllib.error.HTTPError as e:
                status, version = e.code, None
            except Exception:
                status, version = -1, None
            with self._lock:
                self.results.append((t, time.perf_counter() - t, status, version))

    def start(self) -> "Load":
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.clients)]
        for th in self._threads:
            th.start()
        return self

    def stop(self) -> list:
        self._stop.set()
        for th in self._threads:
            th.join(self.timeout + 5)
        return self.results


def get(url: str, timeout: float = 60) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def mount_tmpfs(path: Path, size_mb: int) -> bool:
    """A size-limited tmpfs at `path` (needs root with CAP_SYS_ADMIN, as here and in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def remount(path: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)
