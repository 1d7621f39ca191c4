"""Who may call the scoring service, and how often: API keys with scopes (`score` for reads, `write` for
onboarding), given as `Authorization: Bearer <token>` or `X-API-Key: <token>`, checked in constant time against
SHA-256 digests (tokens are never kept or logged), and a per-key rate limit (the `limits` library, moving
window). With no keys configured the service is open, and `semalign serve` then refuses non-loopback binds."""
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


class RateLimiter:
    def __init__(self, spec: str):
        from limits import parse_many
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        try:
            self.items = parse_many(spec)
        except ValueError as e:
            raise InvalidInputError(f"SEMALIGN_SERVE_RATE_LIMIT '{spec}': {e}") from e
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, who: str) -> None:
        import math
        import time

        for item in self.items:
            if not self.limiter.hit(item, who):
                reset = self.limiter.get_window_stats(item, who).reset_time
                raise RateLimited(f"rate limit {item} exceeded; retry later", max(1, math.ceil(reset - time.time())))


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
