"""`semalign serve` as something anyone on the network can reach: API keys and scopes, bounded requests, rate
limits, no server-side file paths, and no listening beyond loopback without auth. Real HTTP against a real
server on the session's refreshed home."""
import http.client
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import free_port
from conftest import run_cli as _cli

SCORE_TOKEN, WRITE_TOKEN, LIMITED_TOKEN = "score-" + "s" * 26, "write-" + "w" * 26, "limited-" + "l" * 24


def _http(port, method, path, body=None, headers=None, raw=None, host=None):
    """(status, headers, parsed body) of one request; `raw` sends bytes as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"content-type": "application/json", **(headers or {})}
    if host:
        h["Host"] = host
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    text = r.read()
    conn.close()
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        parsed = {"raw": text.decode(errors="replace")}
    return r.status, dict(r.getheaders()), parsed


def _declared_only(port, path, length, headers):
    """Sends only the head of a request declaring a body of `length` bytes and reads the answer: a server that
    answers has not waited for (let alone parsed) the body. Returns (status, seconds to the answer)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {length}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    t0 = time.perf_counter()
    sock.sendall(head.encode())
    reply = sock.recv(65536)
    elapsed = time.perf_counter() - t0
    sock.close()
    return int(reply.split(b" ", 2)[1]), elapsed


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured(refreshed, tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    keys = root / "keys"
    keys.write_text(f"# id token scopes\nreader {SCORE_TOKEN} score\nwriter {WRITE_TOKEN} score,write\n"
                    f"limited {LIMITED_TOKEN} score\n")
    keys.chmod(0o600)
    env = {**refreshed["env"], "SEMALIGN_SERVE_API_KEYS_FILE": str(keys), "SEMALIGN_SERVE_RATE_LIMIT": "40/minute",
           "SEMALIGN_SERVE_MAX_NEW_ITEMS": "4", "SEMALIGN_SERVE_MAX_CANDIDATES": "50"}
    port = free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port)],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if _http(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("server did not become healthy: " + (root / "serve.log").read_text()[-3000:])
    yield {"port": port, "env": env, "log": root / "serve.log"}
    proc.terminate()
    proc.wait(20)
    log.close()


ONE = {"user_id": "u1", "candidates": [{"item_id": "sku-1"}]}


def test_credentials_and_scopes(secured):
    port = secured["port"]
    status, headers, body = _http(port, "POST", "/score", ONE)
    assert status == 401 and headers.get("www-authenticate") == "Bearer" and "credentials" in body["detail"]
    assert _http(port, "POST", "/score", ONE, _bearer("not-a-key-" + "x" * 20))[0] == 401
    assert _http(port, "POST", "/score", ONE, _bearer(SCORE_TOKEN))[0] == 200
    assert _http(port, "POST", "/score", ONE, {"X-API-Key": SCORE_TOKEN})[0] == 200
    # reading is not writing: /items and `onboard: true` need the scope `write`
    item = {"item_id": "sec-new-1", "text": "A quiet film about a lighthouse. Genres: Drama"}
    status, _, body = _http(port, "POST", "/items", {"items": [item]}, _bearer(SCORE_TOKEN))
    assert status == 403 and "write" in body["detail"]
    status, _, body = _http(port, "POST", "/score", {"user_id": "u1", "candidates": [item], "onboard": True},
                            _bearer(SCORE_TOKEN))
    assert status == 403
    # nothing was written by the refused calls: the item is still unknown to the store
    status, _, body = _http(port, "POST", "/score", {"user_id": "u1", "candidates": [{"item_id": "sec-new-1"}]},
                            _bearer(SCORE_TOKEN))
    assert status == 404
    assert _http(port, "POST", "/items", {"items": [item]}, _bearer(WRITE_TOKEN))[0] == 200
    # the onboarding is audited as the key that made it
    import sqlalchemy as sa

    from semalign import state
    from semalign.config import Settings

    s = Settings(home=secured["env"]["SEMALIGN_HOME"])
    with state.engine(s.resolved_state_url()).connect() as c:
        actors = [r.actor for r in c.execute(sa.select(state.audit).where(
            state.audit.c.action == "onboard", state.audit.c.reason.like("%sec-new-1%")))]
    assert actors == ["api:writer"], actors
    # health and version stay open, and say nothing about hosts or paths
    status, _, health = _http(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert _http(port, "GET", "/version")[0] == 200
    # the token never reaches the log
    assert SCORE_TOKEN not in secured["log"].read_text() and WRITE_TOKEN not in secured["log"].read_text()


def test_requests_are_bounded_before_they_cost_anything(secured):
    port, auth = secured["port"], _bearer(SCORE_TOKEN)
    # 10 MB declared: answered 413 before the body is even sent, so it is never read or parsed
    assert _declared_only(port, "/score", 10_000_000, auth)[0] == 413
    # 1,000 candidates with 19,000-character texts (19 MB): the same, before any of it is read
    big = {"user_id": "u1", "candidates": [{"item_id": f"n{k}", "text": "t" * 19_000} for k in range(1000)]}
    assert _declared_only(port, "/score", len(json.dumps(big)), auth)[0] == 413
    # a body without a declared length (chunked) is refused once it grows past the limit (1 MB)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/score")
    for k, v in {**auth, "content-type": "application/json", "Transfer-Encoding": "chunked"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    chunk = b"x" * 65536
    for _ in range(17):
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()
    # under the body limit, more items to encode than one request may carry: 413 before any encoding
    some = {"user_id": "u1", "candidates": [{"item_id": f"m{k}", "text": "a film " * 50} for k in range(5)]}
    status, _, body = _http(port, "POST", "/score", some, auth)
    assert status == 413 and "at most 4" in body["detail"]


def test_the_environment_sets_the_candidate_cap_when_no_flag_does(secured):
    # `semalign serve` was started without --max-candidates: SEMALIGN_SERVE_MAX_CANDIDATES (50) holds, not the
    # CLI's default (1000)
    port, auth = secured["port"], _bearer(SCORE_TOKEN)
    many = {"user_id": "u1", "candidates": [{"item_id": f"sku-{k}"} for k in range(1, 52)]}
    assert _http(port, "POST", "/score", many, auth)[0] in (413, 422)
    assert _http(port, "POST", "/score", {**many, "candidates": many["candidates"][:50]}, auth)[0] == 200


def test_no_server_side_paths_no_control_characters_no_foreign_hosts(secured):
    port, auth = secured["port"], _bearer(SCORE_TOKEN)
    for cand in ({"item_id": "x", "text": "t", "image_path": "/etc/passwd"},
                 {"item_id": "bad\x00id"}, {"item_id": "y" * 257}):
        status, _, body = _http(port, "POST", "/score", {"user_id": "u1", "candidates": [cand]}, auth)
        assert status == 422, (cand, body)
    status, _, body = _http(port, "POST", "/score", ONE, auth, host="evil.example")
    assert status == 400 and body["detail"] == "invalid Host header"


def test_rate_limit_per_key(secured):
    port = secured["port"]
    statuses = [_http(port, "POST", "/score", ONE, _bearer(LIMITED_TOKEN))[:2] for _ in range(45)]
    codes = [s for s, _ in statuses]
    assert codes.count(200) == 40 and codes[40:] == [429] * 5, codes
    assert int(statuses[-1][1]["retry-after"]) >= 1
    assert _http(port, "POST", "/score", ONE, _bearer(SCORE_TOKEN))[0] == 200  # another key is not limited


def test_the_contract_documents_every_status(secured):
    status, _, spec = _http(secured["port"], "GET", "/openapi.json")
    assert status == 200
    for path in ("/score", "/items"):
        documented = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "403", "404", "409", "413", "422", "429", "500", "503"} <= set(documented)
        assert documented["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])


def test_no_listening_beyond_loopback_without_auth(refreshed, tmp_path):
    port = free_port()
    env = {k: v for k, v in refreshed["env"].items() if not k.startswith("SEMALIGN_SERVE_")}
    refused = _cli("serve", "--host", "0.0.0.0", "--port", str(port), env=env, check=False, timeout=60)
    assert refused.returncode == 1 and "refusing to bind 0.0.0.0 without authentication" in refused.stderr
    keys = tmp_path / "keys"
    keys.write_text(f"reader {SCORE_TOKEN} score\n")
    env["SEMALIGN_SERVE_API_KEYS_FILE"] = str(keys)
    refused = _cli("serve", "--host", "0.0.0.0", "--port", str(port), env=env, check=False, timeout=60)
    assert refused.returncode == 1 and "SEMALIGN_SERVE_ALLOWED_HOSTS" in refused.stderr
