"""The refresh's errors, on semalign's error base (exit code and HTTP status carried)."""
from __future__ import annotations

from semalign.errors import ConflictError, InvalidInputError, SemalignError


class RefreshError(SemalignError, RuntimeError):
    pass


class InputValidationError(RefreshError, InvalidInputError):
    http_status = 422


class RefreshLockedError(RefreshError, ConflictError):
    http_status = 409


class LockBusyError(RefreshLockedError):
    """The lock was held when this run tried to take it: nothing was started (a scheduled run ends as skipped)."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else repr(err))[:500]
