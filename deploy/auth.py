"""Who may call the scoring service, and how often: API keys with scopes (`score` for reads, `write` for
onboarding), given as `Authorization: Bearer <token>` or `X-API-Key: <token>`, checked in constant time against
SHA-256 digests (tokens are never kept or logged); a per-key rate limit and a per-address limit on failed
authentications (moving windows in `limits` syntax), counted where every worker of the service sees the same
counts (the online store's Redis, else a sqlite file in the home). With no keys configured the service is open,
and `semalign serve` then refuses non-loopback binds."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from semalign.config import Settings
from semalign.errors import InvalidInputError, SemalignError

SCOPES = {"score": "score users against candidate items", "write": "onboard items into the feature store"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Unauthorized(SemalignError):
    http_status = 401


class Forbidden(SemalignError):
    http_status = 403


class RateLimited(SemalignError):
    http_status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes
    scopes: frozenset


@dataclass(frozen=True)
class Caller:
    id: str
    scopes: frozenset
    authenticated: bool


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Lines `<id> <token> <scope>[,<scope>]`, or several on one line `;`-separated; blank lines skipped, and a `#`
    starting a line or an entry comments out the rest of that line (a commented-out line stays inactive whatever
    it holds). Bad entries are refused by line number, never echoing the token."""
    keys, seen = [], set()
    entries = []
    for n, line in enumerate(text.splitlines(), 1):  # comments first, then `;`: `# a ...; b ...` is all comment
        for entry in line.split(";"):
            entry = entry.strip()
            if entry.startswith("#"):
                break
            if entry:
                entries.append((n, entry))
    for n, entry in entries:
        parts = entry.split()
        if len(parts) != 3:
            raise InvalidInputError(f"{source}, line {n}: expected `<key id> <token> <scope>[,<scope>]`")
        kid, token, scopes = parts
        bad = set(scopes.split(",")) - set(SCOPES)
        if bad or len(token) < 16 or kid in seen:
            why = (f"unknown scope(s) {sorted(bad)} (known: {sorted(SCOPES)})" if bad else
                   "a token of at least 16 characters" if len(token) < 16 else f"a unique key id ('{kid}' repeats)")
            raise InvalidInputError(f"{source}, line {n}: {why}")
        seen.add(kid)
        keys.append(ApiKey(kid, _digest(token), frozenset(scopes.split(","))))
    return keys


class KeyRing:
    def __init__(self, keys: list[ApiKey]):
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyRing":
        keys = []
        if settings.serve_api_keys_file is not None:
            path = Path(settings.serve_api_keys_file)
            if not path.is_file():
                raise InvalidInputError(f"SEMALIGN_SERVE_API_KEYS_FILE {path}: no such file")
            keys += parse_keys(path.read_text(), str(path))
        if settings.serve_api_keys:
            keys += parse_keys(settings.serve_api_keys, "SEMALIGN_SERVE_API_KEYS")
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, token: str) -> ApiKey | None:
        """The key whose token this is; every key is compared (constant time, no early exit)."""
        d, found = _digest(token), None
        for k in self.keys:
            if hmac.compare_digest(d, k.digest):
                found = k
        return found


class SqliteWindows:
    """Moving-window hit counts in a sqlite file every worker process of one host opens: each admission is one
    immediate (write-locked) transaction, so two workers never both take the last slot."""

    def __init__(self, path: Path | None):
        """`path` None: in this process's memory only."""
        import sqlite3
        import threading

        try:
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(":memory:" if path is None else str(path), timeout=30, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS hits (key TEXT NOT NULL, at REAL NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS hits_key_at ON hits (key, at)")
        except (OSError, sqlite3.Error) as e:
            raise InvalidInputError(f"{path}: the rate-limit counts every worker shares cannot be kept there ({e}); "
                                    "SEMALIGN_HOME must be writable for `semalign serve`, or the online store Redis")
        self.lock = threading.Lock()   # one connection per process, its transactions one at a time
        self.admitted = 0

    def admit(self, key: str, now: float, window_s: float, amount: int, count_only: bool = False) -> float:
        """0 when the hit is admitted (and counted, unless `count_only`), else seconds until a slot frees."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("DELETE FROM hits WHERE key = ? AND at <= ?", (key, now - window_s))
                n, oldest = self.db.execute("SELECT COUNT(*), MIN(at) FROM hits WHERE key = ?", (key,)).fetchone()
                if n >= amount:
                    return oldest + window_s - now
                if not count_only:
                    self.db.execute("INSERT INTO hits (key, at) VALUES (?, ?)", (key, now))
                self.admitted += 1
                if self.admitted % 1000 == 0:  # keys nobody uses any more: their hits are old
                    self.db.execute("DELETE FROM hits WHERE at <= ?", (now - 86_400,))
                return 0.0
            finally:
                self.db.execute("COMMIT")


class RedisWindows:
    """Moving-window hit counts in Redis (sorted sets under `semalign:rate:`), shared by every worker of every
    host. A hit is added, then counted; one over the limit is taken back: two racing callers may both be refused,
    never both admitted past the limit. Needs no scripting: a Redis user with write access to those keys only."""

    PREFIX = "semalign:rate:"

    def __init__(self, client):
        self.r = client

    def admit(self, key: str, now: float, window_s: float, amount: int, count_only: bool = False) -> float:
        import uuid

        k = self.PREFIX + key
        member = f"{now:.6f}:{uuid.uuid4().hex[:8]}"
        with self.r.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(k, 0, now - window_s)
            if not count_only:
                pipe.zadd(k, {member: now})
            pipe.zcard(k)
            pipe.pexpire(k, int(window_s * 1000) + 1000)
            n = pipe.execute()[-2]
        if n > amount or (count_only and n >= amount):
            if not count_only:
                self.r.zrem(k, member)
            oldest = self.r.zrange(k, 0, 0, withscores=True)
            return (oldest[0][1] + window_s - now) if oldest else window_s
        return 0.0


def shared_windows(settings: Settings):
    """Where the service's rate counts live, shared by all its workers: the online store's Redis where the
    deployment has one (every host of the service sees the same counts), else a sqlite file in the home."""
    if settings.feast_online == "redis":
        from semalign.feature_repo.repo_config import redis_client

        return RedisWindows(redis_client(settings.redis_url))
    return SqliteWindows(settings.home / "serve" / "rate_limits.db")


# failed authentications a client address may make before it is refused without its token being looked at
AUTH_FAILURE_LIMIT = "20/minute;200/hour"


class RateLimiter:
    """Limits in `limits` syntax ("100/minute;2000/hour"), counted per caller in `windows` (SqliteWindows,
    RedisWindows: shared by every worker; None: this process only)."""

    def __init__(self, spec: str, windows=None, setting: str = "SEMALIGN_SERVE_RATE_LIMIT"):
        from limits import parse_many

        try:
            self.items = parse_many(spec)
        except ValueError as e:
            raise InvalidInputError(f"{setting} '{spec}': {e}") from e
        self.windows = SqliteWindows(None) if windows is None else windows

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimiter":
        return cls(settings.serve_rate_limit, shared_windows(settings))

    def hit(self, who: str) -> None:
        """Counts one call of `who`; RateLimited (with when to retry) once a limit is reached."""
        self._admit(who, "rate limit {item} exceeded; retry later", count_only=False)

    def check(self, who: str, what: str) -> None:
        """RateLimited if `who` reached a limit, counting nothing."""
        self._admit(who, what + ": limit {item} reached; retry later", count_only=True)

    def _admit(self, who: str, message: str, count_only: bool) -> None:
        import math
        import time

        for item in self.items:
            wait = self.windows.admit(f"{item}|{who}", time.time(), item.get_expiry(), item.amount, count_only)
            if wait > 0:
                raise RateLimited(message.format(item=item), max(1, math.ceil(wait)))


class Gatekeeper:
    """Authentication with its costs bounded: each key's calls metered (`per_key`), and each client address's
    failed authentications (`failures`): past that limit a client is refused before its token is looked at, so
    tokens cannot be guessed at the service's speed. Counts shared by every worker (`shared_windows`)."""

    def __init__(self, ring: "KeyRing", per_key: RateLimiter, failures: RateLimiter):
        self.ring, self.per_key, self.failures = ring, per_key, failures

    @classmethod
    def from_settings(cls, settings: Settings) -> "Gatekeeper":
        windows = shared_windows(settings)
        return cls(KeyRing.from_settings(settings), RateLimiter(settings.serve_rate_limit, windows),
                   RateLimiter(AUTH_FAILURE_LIMIT, windows, setting="failed authentications"))

    def admit(self, bearer: str | None, api_key: str | None, client: str, needed: set[str]) -> Caller:
        """The caller (see `authenticate`), counted against its key's limit; RateLimited when that limit, or its
        address's failed authentications, ran out. Without keys (loopback only) nothing is metered."""
        if not self.ring:
            return authenticate(self.ring, bearer, api_key, client, needed)
        self.failures.check(f"fail|{client}", "too many failed authentications from this address")
        try:
            who = authenticate(self.ring, bearer, api_key, client, needed)
        except Unauthorized:
            self.failures.hit(f"fail|{client}")
            raise
        self.per_key.hit(f"key|{who.id}")
        return who


def authenticate(ring: KeyRing, bearer: str | None, api_key: str | None, client: str, needed: set[str]) -> Caller:
    """The caller of a request needing `needed` scopes: Unauthorized without a valid token, Forbidden without
    the scopes. With auth off (loopback only) every caller has every scope."""
    if not ring:
        return Caller(f"addr:{client}", frozenset(SCOPES), False)
    token = bearer or api_key
    if not token:
        raise Unauthorized("credentials required: `Authorization: Bearer <token>` or `X-API-Key: <token>`")
    key = ring.check(token)
    if key is None:
        raise Unauthorized("invalid credentials")
    missing = needed - key.scopes
    if missing:
        raise Forbidden(f"this key lacks the scope(s) {sorted(missing)}")
    return Caller(key.id, key.scopes, True)


def check_bind(host: str, ring: KeyRing, allowed_hosts: str) -> None:
    """`semalign serve` refuses to listen beyond loopback unless callers must authenticate and the Host headers
    it answers are named."""
    if host in LOOPBACK:
        return
    if not ring:
        raise InvalidInputError(f"refusing to bind {host} without authentication: set SEMALIGN_SERVE_API_KEYS_FILE "
                                "(lines `<key id> <token> <scope>[,<scope>]`) or bind 127.0.0.1")
    if set(allowed_hosts.split(",")) <= LOOPBACK:
        raise InvalidInputError(f"binding {host}: set SEMALIGN_SERVE_ALLOWED_HOSTS to the host names clients use "
                                "(the default answers loopback names only)")
