"""Offline writers behind one interface: a batch (a version's publish, one onboarding call, a user table) goes to
every view at once and becomes visible whole, or not at all; re-writing the same batch replaces it.

  ParquetOfflineWriter   one parquet file per view and batch, renamed into place (Feast's file offline store)
  PostgresOfflineWriter  one transaction over the views' tables (Feast's Postgres offline store)"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import pandas as pd
import sqlalchemy as sa

from semalign import atomic, state
from semalign.config import Settings
from semalign.feature_repo.errors import reaching
from semalign.feature_repo.repo_config import EMB_VIEW, REVERSE_VIEW, SID_VIEW, USER_VIEW, sa_url

VECTOR_COLUMNS = ("embedding", "content")


class OfflineWriter(Protocol):
    def prepare(self) -> None:
        """Creates what the store needs before Feast's definitions are applied (tables, folders)."""

    def write(self, frames: dict[str, pd.DataFrame], batch: str) -> None:
        """Writes `frames` (view name -> rows) as batch `batch`, atomically across views."""


class ParquetOfflineWriter:
    def __init__(self, root: Path):
        self.root = Path(root)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, frames: dict[str, pd.DataFrame], batch: str) -> None:
        staged = []
        for view, df in frames.items():
            d = self.root / view
            d.mkdir(parents=True, exist_ok=True)
            tmp = atomic.temp_sibling(d / f"{batch}.parquet")
            df.assign(batch=batch).to_parquet(tmp, index=False)
            staged.append((tmp, d / f"{batch}.parquet"))
        for tmp, final in staged:  # renames last, so a crash before them leaves nothing visible
            os.replace(tmp, final)


class PostgresOfflineWriter:
    def __init__(self, url: str, project: str, levels: int):
        self.url, self.project, self.levels = sa_url(url), project, levels
        self._md: sa.MetaData | None = None

    def _tables(self) -> sa.MetaData:
        from sqlalchemy.dialects import postgresql as pg

        cols = {
            SID_VIEW: [sa.Column(f"sid_{lvl}", sa.BigInteger) for lvl in range(self.levels)]
            + [sa.Column("sid_dedup", sa.BigInteger)],
            EMB_VIEW: [sa.Column(c, pg.ARRAY(sa.Float(precision=24))) for c in VECTOR_COLUMNS],
            USER_VIEW: [sa.Column("recent_items", pg.ARRAY(sa.Text)), sa.Column("n_events", sa.BigInteger),
                        sa.Column("positive_rate", sa.Float(precision=24))],
            REVERSE_VIEW: [sa.Column("item_id", sa.Text)],
        }
        md = sa.MetaData()
        for view, extra in cols.items():
            keys = {USER_VIEW: [sa.Column("user_id", sa.Text), sa.Column("users_version", sa.Text)],
                    REVERSE_VIEW: [sa.Column("semantic_id", sa.Text), sa.Column("codebook_version", sa.Text)]}.get(
                view, [sa.Column("item_id", sa.Text), sa.Column("codebook_version", sa.Text)])
            sa.Table(f"{self.project}_{view}", md, *keys, *extra,
                     sa.Column("event_timestamp", sa.DateTime(timezone=True)),
                     sa.Column("created", sa.DateTime(timezone=True)), sa.Column("batch", sa.Text))
        return md

    def prepare(self) -> None:
        md = self._tables()
        with reaching("the Postgres offline store"):
            eng = state.engine(self.url)
            md.create_all(eng)
            for table, column, kind in ((f"{self.project}_{EMB_VIEW}", "content", "real[]"),
                                        (f"{self.project}_{USER_VIEW}", "users_version", "text")):
                if column not in {c["name"] for c in sa.inspect(eng).get_columns(table)}:
                    with eng.begin() as c:  # a table from before the column existed
                        c.execute(sa.text(f'ALTER TABLE "{table}" ADD COLUMN IF NOT EXISTS {column} {kind}'))
        self._md = md

    def write(self, frames: dict[str, pd.DataFrame], batch: str) -> None:
        if self._md is None:
            self.prepare()
        with reaching("the Postgres offline store"):
            with state.engine(self.url).begin() as conn:
                for view, df in frames.items():
                    t = self._md.tables[f"{self.project}_{view}"]
                    conn.execute(t.delete().where(t.c.batch == batch))
                    rows = df.assign(batch=batch)
                    rows = rows.assign(**{c: rows[c].map(lambda v: [float(x) for x in v])
                                          for c in VECTOR_COLUMNS if c in rows})
                    conn.execute(t.insert(), rows.to_dict("records"))


def offline_writer(settings: Settings, repo: Path, levels: int) -> OfflineWriter:
    if settings.feast_offline == "postgres":
        return PostgresOfflineWriter(settings.postgres_url, settings.feast_project, levels)
    return ParquetOfflineWriter(repo / "data" / "offline")
