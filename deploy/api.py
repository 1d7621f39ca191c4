"""The scoring API's request and response schemas (the OpenAPI contract generated clients rely on) and the error
statuses each route documents."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from semalign.data import MAX_REQUEST_TEXT_CHARS as MAX_TEXT


class Candidate(BaseModel):
    """An item by id, with its text when the store may not hold it yet. No image or file path: the service opens
    no file a caller names (unknown fields are refused)."""
    model_config = {"extra": "forbid"}

    item_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    text: Optional[str] = Field(default=None, max_length=MAX_TEXT,
                                description="Content of an item the store may not hold yet (encoded on the fly).")


class ScoreRequest(BaseModel):
    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{
        "user_id": "196", "onboard": False,
        "candidates": [{"item_id": "242"}, {"item_id": "302"},
                       {"item_id": "new-film-1", "text": "A heist on a night train. Genres: Thriller"}]}]}}

    user_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    candidates: list[Candidate] = Field(min_length=1)
    onboard: bool = Field(default=False, description="Also onboard candidates encoded on the fly (scope `write`).")


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
    model_config = {"extra": "forbid"}

    items: list[Candidate] = Field(min_length=1)


class Health(BaseModel):
    """GET /health: 200 `ok` with the versions served, or 503 `unhealthy` with what is missing (never why: the log
    says why)."""
    status: str
    model_version: Optional[str] = None
    codebook_version: Optional[str] = None
    last_check_error: Optional[str] = None
    error: Optional[str] = None


class ErrorBody(BaseModel):
    detail: str = Field(description="What was asked and what is wrong (a 5xx body never names hosts, paths or "
                                    "internal exceptions).")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class RequestValidationBody(BaseModel):
    """The body of a 422 from request validation (FastAPI's own, before any semalign code runs): one issue per
    field that does not fit the schema."""
    detail: list[ValidationIssue]


# the statuses a scoring or onboarding call can answer besides 200; semalign's errors carry theirs
# (semalign/errors.py), mapped in one handler; anything else is a 500 with a generic ErrorBody
def _err(description: str, model=ErrorBody) -> dict:
    return {"model": model, "description": description}


ERRORS = {400: _err("a Host header the service does not answer (SEMALIGN_SERVE_ALLOWED_HOSTS)"),
          401: _err("no credentials, or invalid ones (when the service has API keys)"),
          403: _err("the key lacks the scope this call needs (`score`; `write` to onboard)"),
          404: _err("an unknown user, or items the pinned codebook version lacks and the request sent without content"),
          409: _err("the request contradicts what the store holds"),
          413: _err("a body over the size limit, or more candidates or items to encode than one request may carry"),
          422: _err("bad input: a body that does not fit the schema (RequestValidationBody, one issue per field), or "
                    "content the service refuses (ErrorBody: duplicate candidate ids, an item without text, an id "
                    "or text the data contract refuses)", ErrorBody | RequestValidationBody),
          429: _err("the key's rate limit is used up (Retry-After says when to retry)"),
          503: _err("no champion loaded, the feature store unreachable, or no encoding slot free in time "
                    "(Retry-After)"),
          500: _err("an unexpected error (details in the service's log, never in the body)")}
