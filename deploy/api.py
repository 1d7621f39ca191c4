"""The scoring API's request and response schemas (the OpenAPI contract generated clients rely on) and the error
statuses each route documents.

The schema is as strict as the service: every limit the service enforces on a request's shape is in it (lengths,
patterns, list caps from the service's settings, required fields, strict types), so a request that fits the schema
is never refused for its shape, and one that does not is refused with the same 422 body (RequestValidationBody).
One thing JSON Schema cannot say, "unique by item_id", is in the description and `uniqueItems` says the part it can.
Statuses that depend on the store's state (an unknown user, items the store lacks, more new items than one request
may encode) are answered with ErrorBody and documented per route."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field, field_validator

from semalign.data import MAX_ID_CHARS
from semalign.data import MAX_REQUEST_TEXT_CHARS as MAX_TEXT

# printable (no control characters) and not blank: the data contract's id, as a pattern (\s here is the Unicode
# whitespace str.strip() removes, in the regex engines of pydantic and of JSON Schema validators)
ID_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
TEXT_PATTERN = r"\S"   # at least one character that is not whitespace (unanchored: anywhere in the text)
ID = {"min_length": 1, "max_length": MAX_ID_CHARS, "pattern": ID_PATTERN}
TEXT = {"min_length": 1, "max_length": MAX_TEXT, "pattern": TEXT_PATTERN}


class Candidate(BaseModel):
    """An item by id, with its text when the store may not hold it yet. No image or file path: the service opens
    no file a caller names (unknown fields are refused)."""
    model_config = {"extra": "forbid", "strict": True}

    item_id: str = Field(**ID)
    text: Optional[str] = Field(default=None, **TEXT,
                                description="Content of an item the store may not hold yet (encoded on the fly); "
                                            "ignored for items the store holds.")


class OnboardItem(BaseModel):
    """An item to onboard: its id and its content (required: onboarding encodes it)."""
    model_config = {"extra": "forbid", "strict": True}

    item_id: str = Field(**ID)
    text: str = Field(**TEXT)


def _unique_ids(entries: list, what: str) -> list:
    ids = [e.item_id for e in entries]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise ValueError(f"{what} item_ids must be unique; repeated: {repeated}")
    return entries


def request_models(max_candidates: int, max_new_items: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ScoreRequest, OnboardRequest) with the service's caps in their schema: at most `max_candidates` candidates
    and `max_new_items` items to onboard. List lengths are checked before any entry is validated."""
    unique_candidates = f"Unique by item_id; at most {max_candidates}."

    class ScoreRequest(BaseModel):
        model_config = {"extra": "forbid", "strict": True, "json_schema_extra": {"examples": [{
            "user_id": "196", "onboard": False,
            "candidates": [{"item_id": "242"}, {"item_id": "302"},
                           {"item_id": "new-film-1", "text": "A heist on a night train. Genres: Thriller"}]}]}}

        user_id: str = Field(**ID)
        candidates: list[Candidate] = Field(min_length=1, max_length=max_candidates, description=unique_candidates,
                                            json_schema_extra={"uniqueItems": True})
        onboard: bool = Field(default=False, description="Also onboard candidates encoded on the fly (scope "
                                                         "`write`).")

        @field_validator("candidates")
        @classmethod
        def _unique(cls, v):
            return _unique_ids(v, "candidate")

    class OnboardRequest(BaseModel):
        model_config = {"extra": "forbid", "strict": True}

        items: list[OnboardItem] = Field(min_length=1, max_length=max_new_items,
                                         description=f"Unique by item_id; at most {max_new_items}.",
                                         json_schema_extra={"uniqueItems": True})

        @field_validator("items")
        @classmethod
        def _unique(cls, v):
            return _unique_ids(v, "onboarded")

    return ScoreRequest, OnboardRequest


class Scored(BaseModel):
    item_id: str
    score: float
    sid: list[int]
    source: Literal["store", "on_the_fly", "onboarded"]


class ScoreResponse(BaseModel):
    user_id: str
    model_version: str
    codebook_version: str
    items: list[Scored]


class Onboarded(BaseModel):
    """One onboarded item: its SID under the codebook version (`sid_0` .. `sid_<levels-1>`, then `sid_dedup`)."""
    model_config = {"extra": "allow", "json_schema_extra": {"additionalProperties": {"type": "integer"}}}

    item_id: str
    codebook_version: str
    sid_dedup: int
    onboarded: bool = Field(description="This call wrote the item (false: the version already held it).")


class OnboardResponse(BaseModel):
    codebook_version: str
    items: list[Onboarded]


class Version(BaseModel):
    model: str
    model_version: str
    codebook_version: str
    encoder_version: Optional[str] = None
    loaded_at: float


class Health(BaseModel):
    """GET /health: 200 `ok`, or 200 `degraded` when items the store lacks cannot be encoded (stored items are
    still scored) or the registry cannot be reached (the champion the home last served is served), with the
    versions served; 503 `unhealthy` with what is missing. What, never why: the log says why."""
    status: Literal["ok", "degraded", "unhealthy"]
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
    """The body of every 422: one issue per part of the request that the schema or the data contract refuses
    (`loc` names it: ["body", "candidates", 3, "text"]; ["body"] for the request as a whole)."""
    detail: list[ValidationIssue]


# the statuses a route can answer besides 200; semalign's errors carry theirs (semalign/errors.py), mapped in one
# handler; anything else is a 500 with a generic ErrorBody
def _err(description: str, model=ErrorBody) -> dict:
    return {"model": model, "description": description}


ERRORS = {400: _err("a Host header the service does not answer (SEMALIGN_SERVE_ALLOWED_HOSTS), or more than one"),
          401: _err("no credentials, or invalid ones (when the service has API keys); answered before the body is "
                    "read"),
          403: _err("the key lacks the scope this call needs (`score`; `write` to onboard)"),
          404: _err("an unknown user, or items the pinned codebook version lacks and the request sent without content"),
          408: _err("the body did not arrive within SEMALIGN_SERVE_READ_TIMEOUT_S"),
          409: _err("the request contradicts what the store holds"),
          413: _err("a body over SEMALIGN_SERVE_MAX_BODY_BYTES, or (/score) more candidates the store lacks, to be "
                    "encoded, than SEMALIGN_SERVE_MAX_NEW_ITEMS"),
          422: _err("a request the schema or the data contract refuses: one issue per field", RequestValidationBody),
          429: _err("the key's rate limit is used up (Retry-After says when to retry)"),
          503: _err("no champion loaded, the feature store unreachable, or no encoding slot free in time "
                    "(Retry-After)"),
          500: _err("an unexpected error (details in the service's log, never in the body)")}
