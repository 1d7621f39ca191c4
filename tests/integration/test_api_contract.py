"""The scoring API's contract and its HTTP layer, against a live service with API keys (uvicorn on loopback, run as
`semalign serve` runs it: uvicorn_options), on a copy of the session's refreshed home (onboarding writes stay in
the copy):

- an independent OpenAPI fuzzer (schemathesis, every check, every operation, seeded and bounded) finds nothing:
  every status answered is documented, every body fits its schema, what the schema accepts is served and what it
  refuses is refused;
- real sockets: a body without credentials is refused before it is read, a trickled head or body is cut off,
  an idle connection closed, two Host headers refused, no redirect to the caller's Host;
- /health says `degraded` while content cannot be encoded, and `ok` once it can again."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

WRITE_TOKEN = "write-" + "w" * 26
CAP = 4                 # candidates and items to encode per request: what the schema then says, and cheap to fuzz
READ_TIMEOUT_S = 2      # SEMALIGN_SERVE_READ_TIMEOUT_S here: heads and bodies must arrive within it
FUZZ_EXAMPLES = 12      # generated cases per operation in the fuzzing phase (the coverage phase adds its own)


def _get(base: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def serving(home: Path, **settings):
    """The app as `semalign serve` builds and runs it, in a thread of this process, with API keys; yields its base
    URL once /health answers."""
    import uvicorn

    from semalign.config import Settings
    from semalign.deploy.serve import create_app, uvicorn_options

    s = Settings(home=home, serve_api_keys=f"writer {WRITE_TOKEN} score,write", serve_max_new_items=CAP,
                 serve_rate_limit="100000/minute", serve_read_timeout_s=READ_TIMEOUT_S, **settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(s, check_interval_s=1, max_candidates=CAP), host="127.0.0.1",
                                           port=port, log_level="warning", **uvicorn_options(s)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if _get(base, "/health")[0] in (200, 503):
                break
        except OSError:
            pass
        assert time.time() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.2)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def live(refreshed, tmp_path_factory):
    """The service on a copy of the home, and the fuzzer already running against it (its run overlaps the socket
    tests, which mostly wait out deadlines; test_an_openapi_fuzzer_finds_nothing, last, reads its result)."""
    home = tmp_path_factory.mktemp("contract") / "home"
    shutil.copytree(refreshed["home"], home)
    with serving(home) as base:
        here = Path(__file__).resolve().parent
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "api_contract_hooks", "SEMALIGN_FUZZ_USER": "u1",
               "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
        root = home.parent
        with open(root / "fuzz.out", "w") as out:
            fuzz = subprocess.Popen(
                [str(Path(sys.executable).with_name("schemathesis")), "run", base + "/openapi.json",
                 "-H", f"Authorization: Bearer {WRITE_TOKEN}", "--checks", "all",
                 "--phases", "examples,coverage,fuzzing", "--max-examples", str(FUZZ_EXAMPLES), "--seed", "32",
                 "--generation-deterministic", "--workers", "1", "--request-timeout", "60", "--no-color",
                 "--report", "ndjson", "--report-ndjson-path", str(root / "fuzz.ndjson")],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield {"base": base, "port": int(base.rsplit(":", 1)[1]), "home": home, "root": root, "fuzz": fuzz}
        finally:
            if fuzz.poll() is None:
                fuzz.kill()
                fuzz.wait()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it does not in 30 s)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_body_without_credentials_is_refused_before_it_is_read(live):
    """The head of a request declaring a near-1 MB body, without a key or with a wrong one: answered 401 from the
    head alone (none of the body is sent) and the connection closed, so unauthenticated bodies hold no memory."""
    for auth in ("", f"Authorization: Bearer not-a-key-{'x' * 20}\r\n", "X-API-Key: short\r\n"):
        sock = _connect(live["port"])
        sock.sendall(f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 999000\r\n{auth}\r\n".encode())
        reply = _answer(sock)
        sock.close()
        assert _status(reply) == 401 and b"www-authenticate: Bearer" in reply.lower().replace(b"bearer", b"Bearer")
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["detail"]


def test_a_trickled_body_times_out(live):
    """An authenticated head, then a body that does not come: 408 once the read timeout has passed, and closed."""
    sock = _connect(live["port"])
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
                 f"Authorization: Bearer {WRITE_TOKEN}\r\n\r\n{{\"user_id\": ".encode())
    reply = _answer(sock)
    sock.close()
    assert _status(reply) == 408 and b"did not arrive" in reply, reply[:300]


def test_a_trickled_head_and_an_idle_connection_are_cut_off(live):
    idle, sock = _connect(live["port"]), _connect(live["port"])   # both wait out the same deadline
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # and no more
    reply = _answer(sock)
    sock.close()
    assert _status(reply) == 408 and b"head did not arrive" in reply, reply[:300]
    assert _answer(idle) == b""   # closed without a word
    idle.close()


def test_one_host_header_and_no_redirect_to_it(live):
    one = json.dumps({"user_id": "u1", "candidates": [{"item_id": "sku-1"}]}).encode()
    head = (f"POST /score HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {WRITE_TOKEN}\r\nContent-Length: {len(one)}\r\n\r\n").encode()
    for path in (b"/score", b"/score/"):   # h11 refuses the request before the app sees it
        sock = _connect(live["port"])
        sock.sendall(head.replace(b"/score", path, 1) + one)
        reply = _answer(sock)
        sock.close()
        assert _status(reply) == 400 and b"location" not in reply.lower(), reply[:300]
    # a trailing slash is not a route, and nothing answers it with a redirect to the Host the caller sent
    req = urllib.request.Request(live["base"] + "/score/", data=one, method="POST",
                                 headers={"content-type": "application/json", "Authorization": f"Bearer {WRITE_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404 and e.value.headers.get("location") is None


def test_the_host_guard_refuses_two_host_headers_whatever_the_protocol():
    """Behind a protocol that lets two Host headers through (uvicorn's httptools), the guard refuses them: Starlette
    would build URLs from the first while a check of the last passed."""
    import asyncio

    from semalign.deploy.guards import TrustedHosts

    async def app(scope, receive, send):
        raise AssertionError("reached the app")

    sent = []

    async def send(message):
        sent.append(message)

    for hosts in ([b"evil.example", b"127.0.0.1"], [], [b"evil.example"]):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": "/score", "headers": [(b"host", h) for h in hosts]}
        asyncio.run(TrustedHosts(app, ["127.0.0.1"])(scope, None, send))
        assert sent[0]["status"] == 400, hosts
        assert json.loads(sent[1]["body"])["detail"] in ("exactly one Host header is required", "invalid Host header")


def test_health_is_degraded_while_new_content_cannot_be_encoded(live, refreshed, tmp_path):
    """The codebook folder of the served version gone before the service first encodes: /health says `degraded`
    (200: items the store holds are still scored), on-the-fly scoring is a 500, and both recover once the folder
    is back."""
    from semalign.artifacts import codebook_folder
    from semalign.config import Settings

    home = tmp_path / "home"
    shutil.copytree(refreshed["home"], home)
    version = _get(live["base"], "/health")[1]["codebook_version"]
    folder = codebook_folder(Settings(home=home), version).path
    moved = folder.rename(folder.with_name(folder.name + ".away"))
    new = {"user_id": "u1", "candidates": [{"item_id": "sku-1"},
                                           {"item_id": "degraded-new-1", "text": "A film about a lost codebook."}]}

    def wait_for(base, status):
        deadline = time.time() + 60
        while (body := _get(base, "/health")[1])["status"] != status and time.time() < deadline:
            time.sleep(0.2)
        return body

    with serving(home) as base:
        body = wait_for(base, "degraded")
        assert body["status"] == "degraded" and "cannot be encoded" in body["error"], body
        assert _get(base, "/health")[0] == 200
        req = urllib.request.Request(base + "/score", data=json.dumps(new).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              "Authorization": f"Bearer {WRITE_TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 500
        moved.rename(folder)
        assert wait_for(base, "ok")["status"] == "ok"
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200


def test_an_openapi_fuzzer_finds_nothing(live):
    """Every operation, every check schemathesis has, positive and negative cases: the examples, the coverage phase
    (each schema boundary and its violation) and a seeded fuzzing phase (started by the `live` fixture). The hooks
    (api_contract_hooks.py) tell it the one rule JSON Schema has no keyword for (unique by item_id) and a user the
    store holds."""
    code = live["fuzz"].wait(timeout=300)
    out = (live["root"] / "fuzz.out").read_text()
    assert code == 0 and "No issues found" in out, out[-10000:]
    assert "Selected: 4/4" in out and "Tested: 4" in out, out[-3000:]
    # every operation answered 200 at least once: the fuzzer reached past validation into scoring and onboarding
    ok = set()
    for line in (live["root"] / "fuzz.ndjson").read_text().splitlines():
        ev = json.loads(line).get("ScenarioFinished") or {}
        for step in (ev.get("recorder") or {}).get("interactions", {}).values():
            req, resp = step.get("request") or {}, step.get("response") or {}
            if resp.get("status_code") == 200:
                ok.add((req.get("method"), req.get("uri", "").split(live["base"], 1)[-1].split("?")[0]))
    assert {("GET", "/health"), ("GET", "/version"), ("POST", "/score"), ("POST", "/items")} <= ok, sorted(ok)
