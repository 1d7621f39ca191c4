"""`semalign serve`: the HTTP scoring API. Thin routes over the scoring service (deploy/scoring_service.py), which
scores with the champion the holder keeps loaded (deploy/champion.py); schemas in deploy/api.py."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from semalign.config import Settings
from semalign.deploy.api import ERRORS, OnboardRequest, ScoreRequest, ScoreResponse


def create_app(settings: Settings, check_interval_s: float = 30.0, max_candidates: int = 1000) -> FastAPI:
    from semalign.deploy.champion import ChampionHolder
    from semalign.deploy.scoring_service import ScoringService
    from semalign.errors import SemalignError

    champion = ChampionHolder(settings, check_interval_s)
    service = ScoringService(champion, max_candidates)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        champion.start()
        yield
        champion.stop()

    app = FastAPI(title="semalign scoring API", version="1", lifespan=lifespan,
                  description="Scores a user against candidate items with the champion ranker and Feast features.")
    app.state.service = service

    @app.exception_handler(SemalignError)
    def semalign_error(request, e: SemalignError):
        return JSONResponse({"detail": str(e)}, status_code=e.http_status)

    @app.exception_handler(ValueError)
    def input_error(request, e: ValueError):  # the checks on request content raise ValueError
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.get("/health")
    def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/version")
    def version():
        return service.version()

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS)
    def score(req: ScoreRequest):
        return service.score(req)

    @app.post("/items", responses=ERRORS)
    def onboard(req: OnboardRequest):
        return service.onboard(req)

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for `semalign serve` (each worker process builds its own app from the environment)."""
    import os

    return create_app(Settings(), check_interval_s=float(os.environ.get("SEMALIGN_SERVE_CHECK_INTERVAL", "30")),
                      max_candidates=int(os.environ.get("SEMALIGN_SERVE_MAX_CANDIDATES", "1000")))
