"""The errors semalign handles, under one base that carries the command line's exit code and the HTTP status,
so the CLI and the scoring service answer the same error the same way (handled once: `semalign.cli.main`, and
the service's exception handler).

Exit codes of `semalign`:
  0  done
  1  failed: a handled error (bad input, a store or server unreachable, a refresh lock held), message on stderr
  2  usage: unknown command or option (click's own code)
  3  the refresh ran, but its gates blocked the promotion (the verdict is in the output)
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATES_BLOCKED = 0, 1, 2, 3


class SemalignError(Exception):
    """Base of every error semalign reports without a traceback."""
    exit_code = EXIT_FAILED
    http_status = 500

    def __str__(self):  # a KeyError subclass would quote its message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidInputError(SemalignError, ValueError):
    """The caller's input is wrong (a dataset row, a request field, a model file)."""
    http_status = 422


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
