"""`semalign serve`: the HTTP scoring API.

Loads the champion ranker by alias, reads features from the Feast online store pinned to the champion's
codebook version, and scores a user against candidate items. A candidate the store has never seen but whose
content comes in the request is encoded and given a SID on the fly with the champion's codebook (and onboarded
when asked). The alias is checked on an interval; a new champion is loaded beside the old one and swapped in
whole, so a ranker is never paired with another codebook version's features."""
from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from semalign.config import Settings

MAX_TEXT = 20_000


class Candidate(BaseModel):
    item_id: str = Field(min_length=1, max_length=256)
    text: Optional[str] = Field(default=None, max_length=MAX_TEXT,
                                description="Content of an item the store may not hold yet (encoded on the fly).")
    image_path: Optional[str] = Field(default=None, max_length=4096)


class ScoreRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    candidates: list[Candidate] = Field(min_length=1)
    onboard: bool = Field(default=False, description="Also onboard candidates encoded on the fly.")

    model_config = {"json_schema_extra": {"examples": [{
        "user_id": "196", "onboard": False,
        "candidates": [{"item_id": "242"}, {"item_id": "302"},
                       {"item_id": "new-film-1", "text": "A heist on a night train. Genres: Thriller"}]}]}}


class Scored(BaseModel):
    item_id: str
    score: float
    sid: list[int]
    source: str          # store | on_the_fly | onboarded


class ScoreResponse(BaseModel):
    user_id: str
    model_version: str
    codebook_version: str
    items: list[Scored]


class OnboardRequest(BaseModel):
    items: list[Candidate] = Field(min_length=1)


class ErrorBody(BaseModel):
    detail: str = Field(description="What was asked and what is wrong.")


# the statuses a scoring or onboarding call can answer besides 200 and request-validation 422s; semalign's errors
# carry theirs (semalign/errors.py), mapped in one handler
ERRORS = {404: {"model": ErrorBody, "description": "an unknown user, or items the pinned codebook version lacks "
                                                  "and the request sent without content"},
          409: {"model": ErrorBody, "description": "the request contradicts what the store holds"},
          413: {"model": ErrorBody, "description": "more candidates or items than one request may carry"},
          503: {"model": ErrorBody, "description": "no champion loaded, or the feature store is unreachable"}}


class _Served:
    """One champion: its scorer (pinned to its codebook version) and versions, swapped in as a unit."""

    def __init__(self, settings: Settings, registry, mv):
        from semalign.deploy.scoring import RankerScorer

        key = mv.tags.get("input_key") or f"v{mv.version}"
        folder = registry.download_ranker(mv, settings.home / "rankers" / key)
        self.scorer = RankerScorer(folder, settings)
        self.model_version = str(mv.version)
        self.codebook_version = self.scorer.codebook_version
        self.encoder_version = mv.tags.get("encoder_version")
        self.loaded_at = time.time()


def create_app(settings: Settings, check_interval_s: float = 30.0, max_candidates: int = 1000) -> FastAPI:
    from semalign.deploy.registry import CHAMPION, Registry
    from semalign.errors import SemalignError
    from semalign.feature_repo.errors import StoreUnavailableError

    app = FastAPI(title="semalign scoring API", version="1",
                  description="Scores a user against candidate items with the champion ranker and Feast features.")

    @app.exception_handler(SemalignError)
    def semalign_error(request, e: SemalignError):
        return JSONResponse({"detail": str(e)}, status_code=e.http_status)

    @app.exception_handler(ValueError)
    def input_error(request, e: ValueError):  # the checks on request content raise ValueError
        return JSONResponse({"detail": str(e)}, status_code=422)

    registry = Registry(settings)
    lock = threading.Lock()
    state = {"served": None, "error": None, "checked_at": 0.0}

    def load_champion():
        mv = registry.version_by_alias(CHAMPION)
        if mv is None:
            raise RuntimeError(f"model '{settings.model_name}' has no champion yet: run `semalign run` first")
        cur = state["served"]
        if cur is not None and cur.model_version == str(mv.version):
            return cur
        new = _Served(settings, registry, mv)
        with lock:
            state["served"] = new
        return new

    def served() -> _Served:
        now = time.time()
        if state["served"] is None or now - state["checked_at"] > check_interval_s:
            state["checked_at"] = now
            try:
                load_champion()
                state["error"] = None
            except Exception as e:  # keep serving the loaded champion; report the failure in /health
                state["error"] = f"{type(e).__name__}: {e}"
        if state["served"] is None:
            raise HTTPException(503, detail=f"no model loaded: {state['error']}")
        return state["served"]

    @app.on_event("startup")
    def _startup():
        try:
            load_champion()
        except Exception as e:
            state["error"] = f"{type(e).__name__}: {e}"

        def poll():
            while True:
                time.sleep(check_interval_s)
                try:
                    served()
                except HTTPException:
                    pass

        threading.Thread(target=poll, daemon=True, name="champion-poll").start()

    @app.get("/health")
    def health():
        s = state["served"]
        if s is None:
            return JSONResponse({"status": "unhealthy", "error": state["error"]}, status_code=503)
        try:
            s.scorer.store.read_online(["__health__"], s.codebook_version, s.scorer.levels)
        except StoreUnavailableError as e:
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return {"status": "ok", "model_version": s.model_version, "codebook_version": s.codebook_version,
                "last_check_error": state["error"]}

    @app.get("/version")
    def version():
        s = served()
        return {"model": settings.model_name, "model_version": s.model_version, "codebook_version": s.codebook_version,
                "encoder_version": s.encoder_version, "loaded_at": s.loaded_at}

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS)
    def score(req: ScoreRequest):
        if len(req.candidates) > max_candidates:
            raise HTTPException(413, detail=f"{len(req.candidates)} candidates; at most {max_candidates} per request")
        ids = [c.item_id for c in req.candidates]
        if len(set(ids)) != len(ids):
            raise HTTPException(422, detail="candidate item_ids must be unique")
        s = served()
        sc = s.scorer
        users = sc.store.users_online([req.user_id])
        if users[0] is None:
            raise HTTPException(404, detail=f"unknown user '{req.user_id}' (not in the feature store)")
        feats, hists, _ = sc.user_rows([req.user_id], records=users)
        # one read for candidates and history: whatever the store lacks must come with content
        known = sc.item_features(list(dict.fromkeys(ids + hists[0])))
        new = [c for c in req.candidates if not known[c.item_id][1]]
        no_content = [c.item_id for c in new if not (c.text and c.text.strip())]
        if no_content:
            raise HTTPException(404, detail=f"items not in the store and sent without content: {no_content[:10]}")
        extra, source = {}, {i: "store" for i in ids}
        if new:
            import pandas as pd

            frame = pd.DataFrame({"item_id": [c.item_id for c in new], "text": [c.text for c in new],
                                  "image_path": [c.image_path for c in new]})
            if req.onboard:
                out = sc.store.onboard(frame, version=s.codebook_version)
                for r in out.itertuples():
                    source[r.item_id] = "onboarded"
                known.update(sc.item_features([c.item_id for c in new]))
            else:
                c_new, emb, raw = sc.store.encode(frame, version=s.codebook_version)
                for k, c in enumerate(new):
                    extra[c.item_id] = (c_new[k], emb[k], raw[k])
                    source[c.item_id] = "on_the_fly"
        # the response's SIDs: on-the-fly items have no dedup level (they hold no slot in the store)
        sids = {i: (extra[i][0] if i in extra else known[i][0]) for i in ids}
        feats_of = dict(extra)  # everything already read goes in, so scoring reads nothing twice
        for iid, (c, f, e, r) in known.items():
            if f and iid not in feats_of:
                feats_of[iid] = (c[: sc.levels], e, r)
        p = sc.score_rows(np.repeat(feats, len(ids), 0), ids, [hists[0]] * len(ids), extra=feats_of)
        items = []
        for j, iid in enumerate(ids):
            sid = np.asarray(sids[iid]).tolist()
            items.append(Scored(item_id=iid, score=float(p[j]), sid=[int(x) for x in sid], source=source[iid]))
        items.sort(key=lambda r: -r.score)
        return ScoreResponse(user_id=req.user_id, model_version=s.model_version, codebook_version=s.codebook_version,
                             items=items)

    @app.post("/items", responses=ERRORS)
    def onboard(req: OnboardRequest):
        if len(req.items) > max_candidates:
            raise HTTPException(413, detail=f"{len(req.items)} items; at most {max_candidates} per request")
        s = served()
        missing = [c.item_id for c in req.items if not (c.text and c.text.strip())]
        if missing:
            raise HTTPException(422, detail=f"items need non-empty text: {missing[:10]}")
        import pandas as pd

        frame = pd.DataFrame({"item_id": [c.item_id for c in req.items], "text": [c.text for c in req.items],
                              "image_path": [c.image_path for c in req.items]})
        out = s.scorer.store.onboard(frame, version=s.codebook_version)
        return {"codebook_version": s.codebook_version, "items": out.to_dict("records")}

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for `semalign serve` (each worker process builds its own app from the environment)."""
    import os

    return create_app(Settings(), check_interval_s=float(os.environ.get("SEMALIGN_SERVE_CHECK_INTERVAL", "30")),
                      max_candidates=int(os.environ.get("SEMALIGN_SERVE_MAX_CANDIDATES", "1000")))
