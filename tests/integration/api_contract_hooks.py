"""Schemathesis hooks for the contract test (tests/integration/test_api_contract.py), loaded by the fuzzer's own
process through SCHEMATHESIS_HOOKS. They tell the fuzzer what the OpenAPI document says in words where JSON Schema
has no keyword, and give it a user the store holds, so that scoring itself is fuzzed, not only its 404."""
import os

import schemathesis

LISTS = {"/score": "candidates", "/items": "items"}


def _positive(case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def filter_case(context, case) -> bool:
    """Schema-valid lists are unique by item_id (the description says so; `uniqueItems` only says that no two
    entries are equal): a generated list repeating an id with another text is not schema-valid in the document's
    words, and is left out of the positive cases."""
    entries = case.body.get(LISTS.get(case.operation.path, "")) if isinstance(case.body, dict) else None
    if not _positive(case) or not isinstance(entries, list):
        return True
    ids = [e.get("item_id") for e in entries if isinstance(e, dict)]
    return len(ids) == len(set(ids))


@schemathesis.hook
def map_case(context, case):
    """A schema-valid /score request for a user the store holds (SEMALIGN_FUZZ_USER): any generated user is unknown
    to the store, and every such request would stop at its 404."""
    if _positive(case) and case.operation.path == "/score" and isinstance(case.body, dict):
        case.body["user_id"] = os.environ["SEMALIGN_FUZZ_USER"]
    return case
