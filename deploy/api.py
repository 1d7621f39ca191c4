"""The scoring API's request and response schemas (the OpenAPI contract generated clients rely on) and the error
statuses each route documents."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from semalign.data import MAX_REQUEST_TEXT_CHARS as MAX_TEXT


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
