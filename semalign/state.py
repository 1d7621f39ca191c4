"""semalign's own small state in SQL tables (design section 6): the catalogue of codebook versions and where
they are published, every item's semantic ID per version (which also hands out dedup slots to onboarded
items without races), named pointers (the current codebook version), the promotion audit history and refresh
locks. sqlite under SEMALIGN_HOME by default; the same Postgres as Feast and MLflow at scale. Feast and MLflow
stay the source of truth for their own objects: these tables link them."""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import sqlalchemy as sa

metadata = sa.MetaData()

codebook_versions = sa.Table(
    "codebook_versions", metadata,
    sa.Column("project", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("parent", sa.String(64)),
    sa.Column("encoder_version", sa.String(64)),
    sa.Column("data_hash", sa.String(64)),
    sa.Column("levels", sa.Integer, nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("n_items", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),       # publishing | published
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("published_at", sa.Float),
)

item_sids = sa.Table(
    "item_sids", metadata,
    sa.Column("project", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(256), primary_key=True),
    sa.Column("sid_key", sa.String(128), nullable=False),     # "c0-c1-c2": the codes without the dedup level
    sa.Column("dedup", sa.Integer, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),       # batch | onboard | pending (reserved, unconfirmed)
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("project", "version", "sid_key", "dedup", name="uq_item_sids_slot"),
)

pointers = sa.Table(
    "pointers", metadata,
    sa.Column("project", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("project", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(128), nullable=False),
    sa.Column("from_value", sa.String(256)),
    sa.Column("to_value", sa.String(256)),
    sa.Column("actor", sa.String(128)),
    sa.Column("reason", sa.Text),
)

locks = sa.Table(
    "locks", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),        # the lease: a holder that stops renewing it loses the lock
)


@lru_cache(maxsize=8)
def engine(url: str) -> sa.Engine:
    kw = {}
    if url.startswith("sqlite"):
        kw["connect_args"] = {"timeout": 30}
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
    eng = sa.create_engine(url, future=True, pool_pre_ping=True, **kw)
    if url.startswith("sqlite"):
        @sa.event.listens_for(eng, "connect")
        def _wal(conn, _):  # readers never block the writer of a publish
            conn.execute("PRAGMA journal_mode=WAL")
    try:
        metadata.create_all(eng)
        if "expires_at" not in {c["name"] for c in sa.inspect(eng).get_columns("locks")}:
            with eng.begin() as c:  # a state database from before leases
                c.execute(sa.text("ALTER TABLE locks ADD COLUMN expires_at FLOAT"))
    except sa.exc.DatabaseError as e:
        eng.dispose()
        raise _unusable(url, e) from e
    return eng


def _unusable(url: str, e: sa.exc.DatabaseError) -> Exception:
    """One line for a state database that cannot be opened: a damaged sqlite file by name, else the server."""
    from semalign.errors import DamagedFileError, UnavailableError

    why = str(e.orig).splitlines()[0][:200] if e.orig is not None else type(e).__name__
    if url.startswith("sqlite") and not isinstance(e, sa.exc.OperationalError):
        path = sa.engine.make_url(url).database
        return DamagedFileError(path, f"{path}: not a readable semalign state database ({why}); move it aside and "
                                "restore it from a backup (it holds the codebook catalogue, the audit history and "
                                "the locks)")
    return UnavailableError(f"state database {sa.engine.make_url(url).render_as_string(hide_password=True)} cannot "
                            f"be opened: {why}")


_acting_as: ContextVar[str | None] = ContextVar("semalign_actor", default=None)


@contextmanager
def acting_as(actor: str):
    """Changes made inside the block are audited as `actor` (a service's caller, e.g. its API key's id)."""
    token = _acting_as.set(actor)
    try:
        yield
    finally:
        _acting_as.reset(token)


def current_actor() -> str:
    """Who made a change, for the audit history: the caller a service is acting for (`acting_as`), else user@host
    of this process, the user from the process's own user id (not LOGNAME or USER, which whoever starts the
    process sets as they like)."""
    import os
    import socket

    if _acting_as.get() is not None:
        return _acting_as.get()
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a user id without a passwd entry (a container's): the id itself
        user = f"uid{os.geteuid()}"
    except ImportError:  # no pwd module (Windows): the login name the OS reports
        import getpass

        user = getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def get_pointer(eng: sa.Engine, project: str, name: str) -> str | None:
    with eng.connect() as c:
        return c.execute(sa.select(pointers.c.value).where(pointers.c.project == project,
                                                           pointers.c.name == name)).scalar()


def record(conn: sa.Connection, project: str, action: str, subject: str, to_value: str | None,
           from_value: str | None = None, reason: str = "", actor: str | None = None) -> None:
    """One audit row, inside the caller's transaction."""
    conn.execute(audit.insert().values(project=project, at=time.time(), action=action, subject=subject,
                                       from_value=from_value, to_value=to_value, actor=actor or current_actor(),
                                       reason=reason))


def move_pointer(conn: sa.Connection, project: str, name: str, value: str, reason: str,
                 actor: str | None = None) -> str | None:
    """Moves a pointer and, when it changed, audits the move as `set_current`, inside the caller's transaction;
    returns the previous value."""
    old = set_pointer(conn, project, name, value)
    if old != value:
        record(conn, project, "set_current", name, value, from_value=old, reason=reason, actor=actor)
    return old


def set_pointer(conn: sa.Connection, project: str, name: str, value: str) -> str | None:
    """Moves a pointer inside the caller's transaction; returns the previous value."""
    old = conn.execute(sa.select(pointers.c.value).where(pointers.c.project == project,
                                                         pointers.c.name == name)).scalar()
    if old is None:
        conn.execute(pointers.insert().values(project=project, name=name, value=value, updated_at=time.time()))
    elif old != value:
        conn.execute(pointers.update().where(pointers.c.project == project, pointers.c.name == name)
                     .values(value=value, updated_at=time.time()))
    return old
