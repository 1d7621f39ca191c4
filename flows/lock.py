"""One writer per project at a time (a leased row in semalign's state tables, plus a Postgres advisory lock where
the state is on Postgres), and the clean-up of what killed runs left behind."""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

import sqlalchemy as sa

from semalign import state
from semalign.config import Settings
from semalign.flows.errors import LockBusyError, RefreshLockedError


class RefreshLock:
    """One writer per project at a time: the refresh, and the commands that would move what it is building
    (promote, rollback, ids publish, codebook build) for a moment each.

    A row in the state tables names the holder (host:pid:token) and carries a lease the holder renews from a
    heartbeat thread; it is deleted only by its holder (compare-and-delete). The lock is free when the row is
    gone, its lease ran out (a holder on any host died, hung or was stopped), or its holder was a process of this
    host that no longer exists. Where the state is on Postgres a session advisory lock is taken too: the database
    frees it the moment the holder's connection dies, so nothing can wedge there. `semalign unlock --force`
    deletes the row (audited); a holder that finds its row gone stops at its next stage."""

    def __init__(self, settings: Settings, purpose: str = "refresh", lease_s: float | None = None):
        import uuid

        self.settings, self.purpose = settings, purpose
        self.lease_s = settings.refresh_lock_lease_s if lease_s is None else lease_s
        self.engine = state.engine(settings.resolved_state_url())
        self.name = lock_name(settings)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._advisory = None

    # ------------------------------------------------------------------ taking and giving back
    def acquire(self) -> "RefreshLock":
        self._take_advisory()
        try:
            self._take_row()
        except BaseException:
            self._drop_advisory()
            raise
        threading.Thread(target=self._heartbeat, daemon=True, name="refresh-lock-heartbeat").start()
        return self

    def release(self) -> None:
        self._stop.set()
        with self.engine.begin() as c:
            c.execute(state.locks.delete().where(state.locks.c.name == self.name, state.locks.c.owner == self.owner))
        self._drop_advisory()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def check(self) -> None:
        """Raises when the lock was taken from this holder (forced, or its lease ran out while it hung)."""
        if self.lost:
            raise RefreshLockedError(f"this {self.purpose} lost the lock of project '{self.settings.feast_project}' "
                                     "(forced open, or its lease ran out); it stops here")

    # ------------------------------------------------------------------ the row and its lease
    def _take_row(self) -> None:
        t = state.locks
        now = time.time()
        with self.engine.begin() as c:
            row = c.execute(sa.select(t).where(t.c.name == self.name)).first()
            if row is not None:
                if _holder_alive(row, now, self.lease_s):
                    expires = row.expires_at or row.acquired_at + self.lease_s
                    raise LockBusyError(
                        f"another refresh of project '{self.settings.feast_project}' is running, or a command that "
                        f"must not overlap one ({row.owner}, since {time.ctime(row.acquired_at)}, lease until "
                        f"{time.ctime(expires)}); "
                        f"the {self.purpose} was not started: try again later, or `semalign unlock --force` if "
                        "that holder is gone")
                c.execute(t.delete().where(t.c.name == self.name, t.c.owner == row.owner))
            try:  # two takers of one freed lock: the primary key lets one in
                c.execute(t.insert().values(name=self.name, owner=self.owner, acquired_at=now,
                                            expires_at=now + self.lease_s))
            except sa.exc.IntegrityError as e:
                raise LockBusyError(f"project '{self.settings.feast_project}' was locked by another process "
                                         f"a moment ago; the {self.purpose} was not started") from e

    def _heartbeat(self) -> None:
        t = state.locks
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self.engine.begin() as c:
                    moved = c.execute(t.update().where(t.c.name == self.name, t.c.owner == self.owner)
                                      .values(expires_at=time.time() + self.lease_s)).rowcount
                if not moved:
                    self.lost = True
                    return
            except Exception:  # the state database blinked: the lease covers a few missed beats
                continue

    # ------------------------------------------------------------------ Postgres advisory lock
    def _take_advisory(self) -> None:
        if self.engine.dialect.name != "postgresql":
            return
        import hashlib

        key = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big", signed=True)
        conn = self.engine.connect()
        if not conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar():
            conn.close()
            raise LockBusyError(f"project '{self.settings.feast_project}' is locked by a live session on the "
                                     f"state database (Postgres advisory lock); the {self.purpose} was not started")
        conn.commit()
        self._advisory = (conn, key)

    def _drop_advisory(self) -> None:
        if self._advisory is not None:
            conn, key = self._advisory
            self._advisory = None
            try:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            finally:
                conn.close()


def _holder_alive(row, now: float, lease_s: float) -> bool:
    """Whether a lock row still holds: its lease runs, and where its holder was a process of this host, that
    process exists. The lease decides on every host: a holder that stopped or hung renews nothing and loses the
    lock when it runs out, even while its process exists; a process of this host that is gone frees it at once."""
    if (row.expires_at or row.acquired_at + lease_s) <= now:
        return False
    host, pid = row.owner.split(":")[0], row.owner.split(":")[1] if row.owner.count(":") else ""
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:  # another user's process: it exists
            return True
    return True


@contextmanager
def refresh_lock(settings: Settings, purpose: str = "refresh"):
    """Holds the project's lock for the block (see RefreshLock); yields the lock, whose `check()` a long holder
    calls between stages."""
    with RefreshLock(settings, purpose) as lock:
        yield lock


def lock_name(settings: Settings) -> str:
    """The project's lock row key."""
    return f"refresh:{settings.feast_project}"


def lock_holder(settings: Settings) -> dict | None:
    """The project's lock row (holder, since, lease until), if any."""
    eng = state.engine(settings.resolved_state_url())
    with eng.connect() as c:
        row = c.execute(sa.select(state.locks).where(state.locks.c.name == lock_name(settings))).first()
    return None if row is None else {"owner": row.owner, "acquired_at": row.acquired_at, "expires_at": row.expires_at}


def force_unlock(settings: Settings, reason: str, actor: str | None = None) -> dict | None:
    """Deletes the project's lock row whoever holds it, audited; returns what was removed (None: no lock). A live
    holder notices at its next stage and stops; a Postgres advisory lock of a live session stays."""
    eng = state.engine(settings.resolved_state_url())
    name = lock_name(settings)
    with eng.begin() as c:
        row = c.execute(sa.select(state.locks).where(state.locks.c.name == name)).first()
        if row is None:
            return None
        c.execute(state.locks.delete().where(state.locks.c.name == name, state.locks.c.owner == row.owner))
        state.record(c, settings.feast_project, "unlock", name, None, from_value=row.owner, reason=reason, actor=actor)
    return {"owner": row.owner, "acquired_at": row.acquired_at, "expires_at": row.expires_at}


def remove_dead_temporaries(settings: Settings) -> list[str]:
    """Temp folders (`.<name>.tmp-<pid>`) that killed runs left under encoders/, codebooks/ and rankers/:
    nothing reads them; they only take disk. Those of live processes (a server downloading a ranker) stay."""
    import shutil

    removed = []
    for sub in (settings.encoders_dir, settings.codebooks_dir, settings.home / "rankers"):
        for tmp in sub.glob(".*.tmp-*") if sub.exists() else []:
            pid = tmp.name.rsplit("-", 1)[-1]
            try:
                os.kill(int(pid), 0)
                continue
            except (ProcessLookupError, ValueError):
                pass
            except PermissionError:
                continue
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed
