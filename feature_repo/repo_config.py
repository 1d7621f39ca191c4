"""The one place that renders the Feast repo semalign applies: `feature_store.yaml` for the configured backends
(secrets as ${VAR} references, never in clear), the feature definitions, and the apply step that keeps the
registry's views in line with them. The rendered folder is a plain Feast repo: `feast` commands work on it."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from semalign import atomic
from semalign.config import Settings
from semalign.feature_repo.errors import FeatureStoreError

TEMPLATE = Path(__file__).resolve().parent
SID_VIEW, EMB_VIEW, USER_VIEW = "item_semantic_id", "item_embedding", "user_recent_items"
REVERSE_VIEW = "semantic_id_item"  # full SID -> item, the reverse of SID_VIEW
PG_PASSWORD_ENV = "SEMALIGN_FEAST_PG_PASSWORD"  # what the rendered feature_store.yaml refers to
REDIS_PASSWORD_ENV = "SEMALIGN_FEAST_REDIS_PASSWORD"
REDIS_TIMEOUTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def sa_url(url: str) -> str:
    """A postgresql:// URL for SQLAlchemy's psycopg 3 driver."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def redis_connection_string(url: str, password_by_reference: bool = False) -> str:
    """The Feast connection string with socket timeouts unless the user set them: without them a hung Redis
    blocks a reader forever. redis-py then retries a failed command 3 times with jittered backoff (<= 7 s).
    With `password_by_reference` a password becomes ${SEMALIGN_FEAST_REDIS_PASSWORD} (set in this process's
    environment), which Feast expands when it reads the file: the rendered file holds no secret."""
    parts = [p.strip() for p in url.split(",")]
    given = {p.split("=", 1)[0] for p in parts if "=" in p}
    if password_by_reference:
        for i, p in enumerate(parts):
            if p.startswith("password="):
                os.environ[REDIS_PASSWORD_ENV] = p.split("=", 1)[1]
                parts[i] = "password=${" + REDIS_PASSWORD_ENV + "}"
    extra = [f"{k}={v}" for k, v in REDIS_TIMEOUTS.items() if k not in given]
    return ",".join([*parts, *extra])


def redis_client(url: str):
    """A redis-py client for the same Redis as Feast's connection string for `url` (host:port first, then
    key=value options; socket timeouts unless the user set them)."""
    import json

    from redis import Redis

    parts = [p.strip() for p in redis_connection_string(url).split(",")]
    host, port = next(p for p in parts if "=" not in p).rsplit(":", 1)
    kw = {}
    for p in parts:
        if "=" in p:
            k, v = p.split("=", 1)
            try:
                kw[k] = json.loads(v)
            except ValueError:
                kw[k] = v
    return Redis(host=host, port=int(port), **kw)


def _postgres(settings: Settings):
    """(SQLAlchemy URL for Feast's SQL registry, URL object for the offline store), secrets as references."""
    pg = sa.engine.make_url(sa_url(settings.postgres_url))
    pg_url = pg.render_as_string(hide_password=False)
    if pg.password:  # the file gets references, not the secret: Feast expands ${VARS} when it reads it
        from urllib.parse import quote

        os.environ[PG_PASSWORD_ENV] = pg.password
        os.environ[PG_PASSWORD_ENV + "_URL"] = quote(pg.password, safe="")
        pg_url = pg.set(password="PASSWORD").render_as_string(hide_password=False).replace(
            ":PASSWORD@", ":${" + PG_PASSWORD_ENV + "_URL}@", 1)
        pg = pg.set(password="${" + PG_PASSWORD_ENV + "}")
    return pg_url, pg


def feature_store_yaml(settings: Settings) -> str:
    s = settings
    pg_url, u = _postgres(s)
    lines = [f"project: {s.feast_project}", "provider: local"]
    if s.feast_registry == "sql":
        lines += ["registry:", "  registry_type: sql", f"  path: {pg_url}", "  cache_ttl_seconds: 60",
                  "  sqlalchemy_config_kwargs:", "    pool_pre_ping: true"]
    else:
        lines += ["registry: data/registry.db"]
    if s.feast_online == "redis":
        lines += ["online_store:", "  type: redis", f"  connection_string: \"{redis_connection_string(s.redis_url, password_by_reference=True)}\""]
    else:
        lines += ["online_store:", "  type: sqlite", "  path: data/online_store.db"]
    if s.feast_offline == "postgres":
        lines += ["offline_store:", "  type: postgres", f"  host: {u.host or '127.0.0.1'}", f"  port: {u.port or 5432}",
                  f"  database: {u.database or 'postgres'}", "  db_schema: public", f"  user: {u.username or 'postgres'}",
                  f"  password: \"{u.password or ''}\"", "  sslmode: disable"]
    else:
        lines += ["offline_store:", "  type: file"]
    lines += ["entity_key_serialization_version: 3"]
    return "\n".join(lines) + "\n"


def render_repo(settings: Settings, levels: int) -> Path:
    """Writes the Feast repo for the configured backends under SEMALIGN_HOME (only what changed)."""
    repo = settings.feature_repo_dir
    (repo / "data" / "offline").mkdir(parents=True, exist_ok=True)
    files = {
        "feature_store.yaml": feature_store_yaml(settings),
        "definitions.py": (TEMPLATE / "definitions.py").read_text(),
        "semalign_repo.json": json.dumps({"levels": levels, "offline": settings.feast_offline,
                                          "table_prefix": settings.feast_project}, indent=2) + "\n",
    }
    for name, text in files.items():
        p = repo / name
        if not p.exists() or p.read_text() != text:
            atomic.write_text(p, text)
    return repo


def definitions(repo: Path, project: str) -> dict:
    """The rendered definitions module's namespace (entities, views, push sources, services)."""
    spec = importlib.util.spec_from_file_location(f"semalign_feast_defs_{project}", repo / "definitions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.__dict__


def ensure_applied(fs, repo: Path, project: str, levels: int, before_apply: Callable[[], None]) -> None:
    """Applies the definitions unless the registry already holds them at this depth. A project applied before
    the embedding view gained `content` is re-applied (Feast adds the field); one whose SID view has another
    depth is refused."""
    from feast import Entity, FeatureService, FeatureView, PushSource

    try:
        have = {fv.name: fv for fv in fs.list_feature_views()}
    except Exception:
        have = {}
    sid, emb, users = have.get(SID_VIEW), have.get(EMB_VIEW), have.get(USER_VIEW)
    want = definitions(repo, project)
    # projects applied before the embedding view gained `content`, user features gained snapshots, the views
    # their ttl or the reverse SID view existed: re-applied
    current = emb is not None and "content" in {f.name for f in emb.features} and users is not None \
        and REVERSE_VIEW in have \
        and "users_version" in {c.name for c in users.entity_columns} \
        and all(have[n].ttl == want[n].ttl for n in (SID_VIEW, EMB_VIEW, USER_VIEW) if n in have)
    if sid is not None and sid.tags.get("levels") == str(levels) and current:
        return
    if sid is not None and sid.tags.get("levels") != str(levels):
        raise FeatureStoreError(f"the feature view {SID_VIEW} in project '{project}' has "
                                f"{sid.tags.get('levels')} levels, not {levels}; use another project "
                                "(SEMALIGN_FEAST_PROJECT) for codebooks of a different depth")
    objs = [o for o in want.values() if isinstance(o, (Entity, FeatureView, FeatureService, PushSource))]
    before_apply()
    fs.apply(objs)
