"""The feature store's errors, on semalign's error base (semalign/errors.py): each carries its HTTP status and
exit code, so every caller answers them the same way."""
from __future__ import annotations

from contextlib import contextmanager

from semalign.errors import NotFoundError, SemalignError, UnavailableError


class FeatureStoreError(SemalignError, RuntimeError):
    """Base class: the message says what was asked and what is wrong (here: a request that contradicts what the
    store holds, such as different content under an immutable version)."""
    http_status = 409


class UnknownVersionError(FeatureStoreError, NotFoundError):
    http_status = 404


class ItemsNotFoundError(FeatureStoreError, NotFoundError):
    http_status = 404

    def __init__(self, version: str, missing: list[str]):
        self.version, self.missing = version, missing
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        super().__init__(f"items not in the feature store for codebook version {version}: {shown}")


class StoreUnavailableError(FeatureStoreError, UnavailableError):
    http_status = 503


def unavailable(what: str, e: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(f"{what} is unreachable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 "nothing was published from this call")


@contextmanager
def reaching(what: str):
    """Around a call to a server: a failure to reach it becomes StoreUnavailableError naming `what`; anything
    else passes through unchanged."""
    try:
        yield
    except SemalignError:
        raise
    except Exception as e:
        if is_connection_error(e):
            raise unavailable(what, e) from e
        raise


def is_connection_error(e: BaseException) -> bool:
    """A failure to reach a server, found by walking the cause chain (drivers wrap their errors differently)."""
    names = {"ConnectionError", "OperationalError", "TimeoutError", "ConnectionRefusedError", "BusyLoadingError"}
    seen = 0
    while e is not None and seen < 10:
        if type(e).__name__ in names or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
