"""`semalign serve` takes its settings from the environment unless a flag says otherwise (issue 32, item 5): the CLI's
own defaults never override SEMALIGN_SERVE_* variables. A real server on an empty home: the candidate cap answers
before any model is needed."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import free_port


def _post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_environment_sets_the_candidate_cap_when_no_flag_does(tmp_path):
    port = free_port()
    env = {**os.environ, "SEMALIGN_HOME": str(tmp_path / "home"), "SEMALIGN_SERVE_MAX_CANDIDATES": "2"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        body = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(3)]}
        deadline = time.time() + 120
        while True:
            try:
                status = _post(port, body)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.3)
        # 3 candidates against the environment's cap of 2: refused as too many, not let through to find no model
        assert status in (413, 422), status
        assert _post(port, {**body, "candidates": body["candidates"][:2]}) == 503   # within the cap: no champion
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
