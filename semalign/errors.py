"""The errors semalign handles, under one base that carries the command line's exit code and the HTTP status,
so the CLI and the scoring service answer the same error the same way (handled once: `semalign.cli.main`, and
the service's exception handler).

Only these errors are handled as facts: product code raises them (never a bare ValueError or KeyError across a
module boundary), each with what a caller needs to act on it. Any other exception is a bug: the CLI prints its
traceback and exits 4, the service answers 500 with a generic body and logs it.

Exit codes of `semalign`:
  0  done
  1  failed: a handled error (bad input, a store or server unreachable, a refresh lock held), message on stderr
  2  usage: unknown command or option (click's own code)
  3  the refresh ran, but its gates blocked the promotion (the verdict is in the output)
  4  internal error: an exception semalign does not handle (a bug), traceback on stderr
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATES_BLOCKED, EXIT_INTERNAL = 0, 1, 2, 3, 4


class SemalignError(Exception):
    """Base of every error semalign reports without a traceback."""
    exit_code = EXIT_FAILED
    http_status = 500

    def __str__(self):  # a KeyError subclass would quote its message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidInputError(SemalignError, ValueError):
    """The caller's input is wrong (a dataset row, a request field, a model file)."""
    http_status = 422


class DataValidationError(InvalidInputError):
    """Input that breaks the data contract. Names the file (None: a batch handed over in memory, such as a request's
    items), the row (1-based data row), the column and what was expected, plus how many rows share the problem."""

    def __init__(self, file: str | Path | None, row: int | None, column: str | None, expected: str, count: int = 1):
        self.file = None if file is None else str(file)
        self.row, self.column, self.expected, self.count = row, column, expected, count
        where = [] if file is None else [f"{file}"]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        more = f" ({count} rows in all)" if count > 1 else ""
        super().__init__(f"{', '.join(where) or 'input'}: expected {expected}{more}")


class DamagedFileError(SemalignError, ValueError):
    """A file semalign reads back (a codebook, an encoder, a ranker, a feature cache) fails its checks and is refused
    by name, never half-read. `path` is the file or folder: rebuild or replace it. It is the server's file, not the
    caller's input: the service answers 500 (and logs the path), the CLI exits 1 with the message."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(message if self.path in message else f"{self.path}: {message}")


@contextmanager
def reading(path: str | Path):
    """Around a loader of `semalign.models`, which raises ValueError or FileNotFoundError (it imports nothing of
    semalign's): a file it refuses or misses becomes DamagedFileError naming `path`. semalign's own errors pass
    through unchanged."""
    try:
        yield
    except SemalignError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise DamagedFileError(path, str(e)) from e


class NotFoundError(SemalignError, KeyError):
    """Something the caller named does not exist (a codebook version, an item, a model version)."""
    http_status = 404


class ConflictError(SemalignError):
    """The request contradicts the current state (an immutable version, a lock someone else holds)."""
    http_status = 409


class TooLargeError(InvalidInputError):
    """A request carries more than one call may (candidates, items, bytes)."""
    http_status = 413


class UnavailableError(SemalignError):
    """A server semalign depends on cannot be reached; retrying later can succeed."""
    http_status = 503


def exit_code(e: BaseException) -> int:
    return getattr(e, "exit_code", EXIT_FAILED)


def http_status(e: BaseException) -> int:
    return getattr(e, "http_status", 500)
