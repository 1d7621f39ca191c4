"""One refresh per project at a time (a row in semalign's state tables), and the clean-up of what killed runs
left behind."""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

from semalign import state
from semalign.config import Settings
from semalign.flows.errors import RefreshLockedError


@contextmanager
def refresh_lock(settings: Settings):
    """One refresh per project at a time. A lock left by a dead process on this host is taken over."""
    import sqlalchemy as sa

    eng = state.engine(settings.resolved_state_url())
    name = f"refresh:{settings.feast_project}"
    me = f"{socket.gethostname()}:{os.getpid()}"
    with eng.begin() as c:
        row = c.execute(sa.select(state.locks).where(state.locks.c.name == name)).first()
        if row is not None:
            host, _, pid = row.owner.rpartition(":")
            alive = True
            if host == socket.gethostname():
                try:
                    os.kill(int(pid), 0)
                except (ProcessLookupError, ValueError):
                    alive = False
                except PermissionError:
                    alive = True
            if alive:
                raise RefreshLockedError(f"another refresh of project '{settings.feast_project}' is running "
                                         f"({row.owner}, since {time.ctime(row.acquired_at)}); try again later")
            c.execute(state.locks.delete().where(state.locks.c.name == name))
        c.execute(state.locks.insert().values(name=name, owner=me, acquired_at=time.time()))
    try:
        yield
    finally:
        with eng.begin() as c:
            c.execute(state.locks.delete().where(state.locks.c.name == name, state.locks.c.owner == me))


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
