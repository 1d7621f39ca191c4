"""`semalign serve`: the HTTP scoring API. Thin routes over the scoring service (deploy/scoring_service.py), which
scores with the champion the holder keeps loaded (deploy/champion.py); schemas in deploy/api.py; API keys, scopes
and rate limits in deploy/auth.py; the head deadline and the host, credential and body guards in
deploy/guards.py, which answer before a route (or the body) is read."""
# no `from __future__ import annotations`: the routes' request models are built per app, and FastAPI reads the
# routes' annotations as objects

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from semalign.config import Settings
from semalign.deploy.api import ERRORS, Health, OnboardResponse, ScoreResponse, Version, request_models
from semalign.deploy.auth import Caller, Forbidden, Gatekeeper
from semalign.state import acting_as

log = logging.getLogger("semalign.serve")
OPEN = {k: ERRORS[k] for k in (400, 500, 503)}   # /health and /version: no credentials, no body
HEALTH = {**OPEN, 200: {"model": Health, "description": "`ok`, or `degraded`: items the store lacks cannot be "
                                                        "encoded (items it holds are still scored), or the "
                                                        "registry cannot be reached"},
          503: {"model": Health, "description": "`unhealthy`: no champion loaded, or its online store unreachable"}}
GUARDED = ERRORS
# the routes that need a key, and the scopes each needs (`onboard: true` on /score also needs `write`: checked in
# the route, from the body)
SCOPES = {("POST", "/score"): {"score"}, ("POST", "/items"): {"write"}}
MAX_HEAD_BYTES = 16 * 1024   # h11's bound on a request head (request line and headers)


def uvicorn_options(settings: Settings) -> dict:
    """How `semalign serve` runs uvicorn: the h11 protocol with a deadline on request heads (deploy/guards.py),
    SEMALIGN_SERVE_READ_TIMEOUT_S as that deadline and as the keep-alive timeout, heads of at most 16 KB."""
    return {"http": "semalign.deploy.guards:HeadDeadlineH11", "timeout_keep_alive": settings.serve_read_timeout_s,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


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
    from semalign.deploy.guards import Authenticate, BodyLimit, TrustedHosts
    from semalign.deploy.scoring_service import ScoringService

    s = settings
    interval = s.serve_check_interval if check_interval_s is None else check_interval_s
    champion = ChampionHolder(s, interval)
    service = ScoringService(champion, s.serve_max_new_items, s.serve_encode_concurrency, s.serve_encode_wait_s,
                             probe_interval_s=interval)
    ScoreRequest, OnboardRequest = request_models(  # noqa: N806 (classes)
        s.serve_max_candidates if max_candidates is None else max_candidates, s.serve_max_new_items)
    check = _checker(Gatekeeper.from_settings(s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        champion.start()
        yield
        champion.stop()

    # no redirect from /score/ to /score: a redirect names a host, and the request's Host is the caller's word
    app = FastAPI(title="semalign scoring API", version="1", lifespan=lifespan, redirect_slashes=False,
                  description="Scores a user against candidate items with the champion ranker and Feast features. "
                              "With API keys configured, /score needs scope `score` (and `write` to onboard), "
                              "/items scope `write`; /health and /version are open.")
    app.state.service = service
    # added innermost first: a request meets TrustedHosts, then Authenticate, then BodyLimit
    app.add_middleware(BodyLimit, max_bytes=s.serve_max_body_bytes, read_timeout_s=s.serve_read_timeout_s)
    app.add_middleware(Authenticate, check=check, guarded=SCOPES)
    app.add_middleware(TrustedHosts, allowed=s.serve_allowed_hosts.split(","))
    _error_handlers(app)

    @app.get("/health", response_model=Health, responses=HEALTH)
    def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/version", response_model=Version, responses=OPEN)
    def version():
        return service.version()

    @app.post("/score", response_model=ScoreResponse, responses=GUARDED)
    def score(req: ScoreRequest, who: Caller = Depends(_caller)):
        if req.onboard and "write" not in who.scopes:
            raise Forbidden("`onboard: true` needs a key with the scope 'write'")
        with acting_as(f"api:{who.id}"):   # what it onboards is audited as its key
            return service.score(req)

    @app.post("/items", response_model=OnboardResponse, responses=GUARDED)
    def onboard(req: OnboardRequest, who: Caller = Depends(_caller)):
        with acting_as(f"api:{who.id}"):
            return service.onboard(req)

    return app


def _checker(gate: Gatekeeper):
    """check(headers, client, scopes): the caller of a request needing `scopes`, counted against its key's rate
    limit (failed authentications against its address's); Unauthorized, Forbidden or RateLimited otherwise. Run
    by the Authenticate guard on the request's head, before its body is read. Without keys the service is open,
    bound to loopback, and not metered."""
    def check(headers: dict[str, str], client: str, scopes: set[str]) -> Caller:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        return gate.admit(bearer, headers.get("x-api-key"), client, scopes)

    return check


_bearer = HTTPBearer(auto_error=False, description="An API key's token (SEMALIGN_SERVE_API_KEYS_FILE).")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same token, as a header.")


def _caller(request: Request, cred: HTTPAuthorizationCredentials | None = Security(_bearer),
            key: str | None = Security(_key_header)) -> Caller:
    """The caller the Authenticate guard found for this request. The security parameters put the two ways to
    present a key in the OpenAPI document; the guard has already checked them."""
    return request.state.caller


def _error_handlers(app: FastAPI) -> None:
    """One answer per error: semalign's errors with their status and message; anything else is a bug: 500 with
    a generic body, the exception and its traceback in the log. A 422 (the schema's validation, or input the data
    contract refuses) is RequestValidationBody, every other status ErrorBody; 401 says how to authenticate, 429/503
    say when to retry. (A ValueError is not bad input by itself: the request's checks raise InvalidInputError.)"""
    from semalign.errors import SemalignError

    def issues(items: list[dict]) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": list(i["loc"]), "msg": i["msg"], "type": i["type"]} for i in items]},
                            status_code=422)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request, e: RequestValidationError):  # the offending input is not echoed back
        return issues(e.errors())

    def error(e: Exception, status: int) -> JSONResponse:
        if status == 422:
            return issues([{"loc": ["body"], "msg": str(e), "type": "value_error"}])
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
        log.error("unhandled error", exc_info=e)  # a handler runs outside the except: the traceback is e's
        return error(e, 500)


def app_from_env() -> FastAPI:
    """uvicorn factory for `semalign serve` (each worker process builds its own app from the environment)."""
    return create_app(Settings())
