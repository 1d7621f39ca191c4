"""API keys and scopes of the scoring service (deploy/auth.py): what a key file may say, and who gets in."""
import pytest

from semalign.deploy.auth import (Forbidden, Gatekeeper, KeyRing, RateLimited, RateLimiter, RedisWindows,
                                  Unauthorized, authenticate, check_bind, parse_keys)
from semalign.errors import InvalidInputError

TOKEN_A, TOKEN_B = "a" * 20, "b" * 20


def test_key_files_are_checked_line_by_line_without_echoing_tokens():
    ring = KeyRing(parse_keys(f"# comment\n\nreader {TOKEN_A} score\nwriter {TOKEN_B} score,write\n", "keys"))
    assert [k.id for k in ring.keys] == ["reader", "writer"]
    assert ring.check(TOKEN_B).id == "writer" and ring.check("c" * 20) is None
    for text, why in ((f"reader {TOKEN_A}", "line 1: expected"), (f"reader {TOKEN_A} admin", "unknown scope"),
                      ("reader short score", "at least 16"),
                      (f"r {TOKEN_A} score\nr {TOKEN_B} score", "line 2: a unique key id")):
        with pytest.raises(InvalidInputError, match=why) as e:
            parse_keys(text, "keys")
        assert TOKEN_A not in str(e.value) and TOKEN_B not in str(e.value)


def test_a_commented_out_line_stays_inactive_whatever_it_holds():
    # `;` separates keys on one line, but a comment is stripped first: the whole line stays a comment
    ring = KeyRing(parse_keys(f"# retired {TOKEN_A} score;revoked {TOKEN_B} score,write\n"
                              f"reader {'c' * 20} score; # old {TOKEN_B} write\n", "keys"))
    assert [k.id for k in ring.keys] == ["reader"]
    assert ring.check(TOKEN_A) is None and ring.check(TOKEN_B) is None
    with pytest.raises(Unauthorized):
        authenticate(ring, TOKEN_B, None, "10.0.0.1", {"score"})


def test_authentication_and_scopes():
    ring = KeyRing(parse_keys(f"reader {TOKEN_A} score;writer {TOKEN_B} score,write", "env"))
    with pytest.raises(Unauthorized):
        authenticate(ring, None, None, "10.0.0.1", {"score"})
    with pytest.raises(Unauthorized):
        authenticate(ring, "z" * 20, None, "10.0.0.1", {"score"})
    with pytest.raises(Forbidden, match="write"):
        authenticate(ring, TOKEN_A, None, "10.0.0.1", {"write"})
    assert authenticate(ring, None, TOKEN_B, "10.0.0.1", {"write"}).id == "writer"
    # with no keys the service is open (loopback only) and callers are told apart by address
    open_caller = authenticate(KeyRing([]), None, None, "127.0.0.1", {"write"})
    assert not open_caller.authenticated and open_caller.id == "addr:127.0.0.1"


def test_rate_limit_and_bind_rules():
    limiter = RateLimiter("3/minute")
    for _ in range(3):
        limiter.hit("k")
    with pytest.raises(RateLimited) as e:
        limiter.hit("k")
    assert e.value.retry_after_s >= 1
    limiter.hit("other")
    with pytest.raises(InvalidInputError, match="SEMALIGN_SERVE_RATE_LIMIT"):
        RateLimiter("lots")
    ring = KeyRing(parse_keys(f"reader {TOKEN_A} score", "env"))
    check_bind("127.0.0.1", KeyRing([]), "127.0.0.1")
    with pytest.raises(InvalidInputError, match="without authentication"):
        check_bind("0.0.0.0", KeyRing([]), "api.example")
    with pytest.raises(InvalidInputError, match="ALLOWED_HOSTS"):
        check_bind("0.0.0.0", ring, "127.0.0.1,localhost")
    check_bind("0.0.0.0", ring, "api.example")


# a worker process of one service: admits what it can of 12 calls by one key, against the counts the home keeps
_WORKER = """
import sys
from semalign.config import Settings
from semalign.deploy.auth import Gatekeeper, RateLimited
keeper = Gatekeeper.from_settings(Settings(home=sys.argv[1], serve_rate_limit="10/minute",
                                           serve_api_keys="reader " + "r" * 20 + " score"))
admitted = 0
for _ in range(12):
    try:
        keeper.admit("r" * 20, None, "10.0.0.9", {"score"})
        admitted += 1
    except RateLimited:
        pass
print(admitted)
"""


def test_the_rate_limit_holds_across_worker_processes(tmp_path):
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    admitted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(admitted) == 10, admitted    # not 10 per process


def test_with_a_redis_online_store_every_worker_counts_in_redis(tmp_path):
    import uuid

    from semalign.config import Settings

    s = Settings(home=tmp_path, feast_online="redis", redis_url="127.0.0.1:6379", serve_rate_limit="10/minute",
                 serve_api_keys=f"k{uuid.uuid4().hex[:12]} {TOKEN_A} score")
    workers = [Gatekeeper.from_settings(s) for _ in range(2)]   # each its own connection, as each process has
    assert all(isinstance(w.per_key.windows, RedisWindows) for w in workers)
    admitted = 0
    for k in range(24):
        try:
            workers[k % 2].admit(TOKEN_A, None, "10.0.0.9", {"score"})
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 10
    assert not (tmp_path / "serve").exists()   # nothing counted in the home


def test_failed_authentications_are_limited_per_address_before_the_token_is_looked_at():
    ring = KeyRing(parse_keys(f"reader {TOKEN_A} score", "keys"))
    keeper = Gatekeeper(ring, RateLimiter("100/minute"), RateLimiter("3/minute"))
    for _ in range(3):
        with pytest.raises(Unauthorized):
            keeper.admit("z" * 20, None, "10.0.0.7", {"score"})
    with pytest.raises(RateLimited, match="failed authentications") as e:
        keeper.admit("z" * 20, None, "10.0.0.7", {"score"})
    assert e.value.retry_after_s >= 1
    with pytest.raises(RateLimited):     # even the right token: this address guesses no more for now
        keeper.admit(TOKEN_A, None, "10.0.0.7", {"score"})
    assert keeper.admit(TOKEN_A, None, "10.0.0.8", {"score"}).id == "reader"   # another address is not held
    with pytest.raises(Forbidden):       # a valid key without the scope is no failed authentication
        keeper.admit(TOKEN_A, None, "10.0.0.8", {"write"})
