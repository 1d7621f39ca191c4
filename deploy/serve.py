"""`semalign serve`: the HTTP scoring API. Thin routes over the scoring service (deploy/scoring_service.py), which
scores with the champion the holder keeps loaded (deploy/champion.py); schemas in deploy/api.py; API keys, scopes
and rate limits in deploy/auth.py; host and body-size guards in deploy/guards.py."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from semalign.config import Settings
from semalign.deploy.api import ERRORS, Health, OnboardRequest, ScoreRequest, ScoreResponse
from semalign.deploy.auth import Caller, Forbidden, KeyRing, RateLimiter, authenticate
from semalign.state import acting_as

log = logging.getLogger("semalign.serve")
OPEN = {k: ERRORS[k] for k in (400, 500, 503)}   # /health and /version: no credentials, no body
HEALTH = {**OPEN, 503: {"model": Health, "description": "unhealthy: no champion loaded, or its online store "
                                                         "unreachable"}}
GUARDED = ERRORS


def public_detail(e: Exception, status: int) -> str:
    """What a caller is told: a 4xx is one of semalign's errors about the request, whose message is written for the
    caller; 5xx ones never name hosts, paths or URLs, and an unexpected exception's own text never leaves the log."""
    from semalign.deploy.champion import NoChampionError
    from semalign.deploy.scoring_service import EncodingBusy
    from semalign.errors import SemalignError
    from semalign.feature_repo.errors import StoreUnavailableError

    if not isinstance(e, SemalignError):
        return "internal error"
    if status < 500 or isinstance(e, EncodingBusy):
        return str(e)
    if isinstance(e, NoChampionError):
        return "no model loaded; retry later"
    if isinstance(e, StoreUnavailableError):
        return "the feature store is unreachable; retry later"
    return "internal error"


def create_app(settings: Settings, check_interval_s: float | None = None, max_candidates: int | None = None) -> FastAPI:
    from semalign.deploy.champion import ChampionHolder
    from semalign.deploy.guards import BodyLimit, TrustedHosts
    from semalign.deploy.scoring_service import ScoringService

    s = settings
    champion = ChampionHolder(s, s.serve_check_interval if check_interval_s is None else check_interval_s)
    service = ScoringService(champion, s.serve_max_candidates if max_candidates is None else max_candidates,
                             s.serve_max_new_items, s.serve_encode_concurrency, s.serve_encode_wait_s)
    caller = _callers(KeyRing.from_settings(s), RateLimiter(s.serve_rate_limit))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        champion.start()
        yield
        champion.stop()

    app = FastAPI(title="semalign scoring API", version="1", lifespan=lifespan,
                  description="Scores a user against candidate items with the champion ranker and Feast features. "
                              "With API keys configured, /score needs scope `score` (and `write` to onboard), "
                              "/items scope `write`; /health and /version are open.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=s.serve_max_body_bytes)
    app.add_middleware(TrustedHosts, allowed=s.serve_allowed_hosts.split(","))
    _error_handlers(app)

    @app.get("/health", response_model=Health, responses=HEALTH)
    def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/version", responses=OPEN)
    def version():
        return service.version()

    @app.post("/score", response_model=ScoreResponse, responses=GUARDED)
    def score(req: ScoreRequest, who: Caller = Depends(caller("score"))):
        if req.onboard and "write" not in who.scopes:
            raise Forbidden("`onboard: true` needs a key with the scope 'write'")
        with acting_as(f"api:{who.id}"):   # what it onboards is audited as its key
            return service.score(req)

    @app.post("/items", responses=GUARDED)
    def onboard(req: OnboardRequest, who: Caller = Depends(caller("write"))):
        with acting_as(f"api:{who.id}"):
            return service.onboard(req)

    return app


def _callers(ring: KeyRing, limiter: RateLimiter):
    """caller(*scopes): the dependency that authenticates a request for `scopes` and counts it against its key's
    rate limit (security dependencies run before the body is validated: no credentials, no parsing). Without
    keys the service is open, bound to loopback, and not metered."""
    bearer = HTTPBearer(auto_error=False, description="An API key's token (SEMALIGN_SERVE_API_KEYS_FILE).")
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same token, as a header.")

    def caller(*scopes: str):
        def dependency(request: Request, cred: HTTPAuthorizationCredentials | None = Security(bearer),
                       key: str | None = Security(key_header)) -> Caller:
            who = authenticate(ring, cred.credentials if cred else None, key,
                               request.client.host if request.client else "unknown", set(scopes))
            if who.authenticated:  # open mode serves loopback only: nothing to meter
                limiter.hit(who.id)
            return who
        return dependency

    return caller


def _error_handlers(app: FastAPI) -> None:
    """One answer per error: semalign's errors with their status and message; anything else is a bug: 500 with
    a generic body, the exception and its traceback in the log. The body is always ErrorBody; 401 says how to
    authenticate, 429/503 say when to retry. (A ValueError is not bad input by itself: the request's checks raise
    InvalidInputError, and pydantic's own request validation answers 422 before any code here runs.)"""
    from semalign.errors import SemalignError

    def error(e: Exception, status: int) -> JSONResponse:
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if hasattr(e, "retry_after_s"):
            headers["Retry-After"] = str(e.retry_after_s)
        if status >= 500:
            log.warning("%s: %s", type(e).__name__, e)
        return JSONResponse({"detail": public_detail(e, status)}, status_code=status, headers=headers)

    @app.exception_handler(SemalignError)
    def semalign_error(request, e: SemalignError):
        return error(e, e.http_status)

    @app.exception_handler(Exception)
    def unexpected(request, e: Exception):
        log.exception("unhandled error")
        return error(e, 500)


def app_from_env() -> FastAPI:
    """uvicorn factory for `semalign serve` (each worker process builds its own app from the environment)."""
    return create_app(Settings())
