"""The feature-store plugin: item semantic IDs and aligned vectors as versioned Feast features.

`SemanticIdStore(settings)` renders the Feast repo in this folder under SEMALIGN_HOME for the configured
backends, applies it, and offers:
  publish(codebook, item_ids, embeddings)   a codebook version -> offline store + online store
  semantic_ids(item_ids, version=None)      online read, pinned to a version (default: the current one)
  historical(frame, version=None)           point-in-time join for training frames
  onboard(items)                            content -> encoder -> SID (pinned codebook) -> online + offline
Versions are keyed by the `codebook_version` join key, so several coexist and publishing v2 changes nothing
a reader pinned to v1 sees. A version becomes readable only when its publish has finished (state tables).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from semalign import atomic, state
from semalign.checkpoints import checkpoint
from semalign.config import Settings
from semalign.feature_repo.errors import FeatureStoreError, ItemsNotFoundError, UnknownVersionError, reaching

REPO_TEMPLATE = Path(__file__).resolve().parent
SID_VIEW, EMB_VIEW, USER_VIEW = "item_semantic_id", "item_embedding", "user_recent_items"
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
CURRENT = "current_codebook"
PG_PASSWORD_ENV = "SEMALIGN_FEAST_PG_PASSWORD"  # what the rendered feature_store.yaml refers to
# Feast converts every timestamp through datetime and says so once per row batch
warnings.filterwarnings("ignore", message="Discarding nonzero nanoseconds", category=UserWarning)


def _sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


REDIS_TIMEOUTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def redis_connection_string(url: str) -> str:
    """The Feast connection string with socket timeouts unless the user set them: without them a hung Redis
    blocks a reader forever. redis-py then retries a failed command 3 times with jittered backoff (<= 7 s)."""
    given = {part.split("=", 1)[0].strip() for part in url.split(",") if "=" in part}
    extra = [f"{k}={v}" for k, v in REDIS_TIMEOUTS.items() if k not in given]
    return ",".join([url, *extra])


def render_repo(settings: Settings, levels: int) -> Path:
    """Writes the Feast repo for the configured backends under SEMALIGN_HOME (only what changed)."""
    repo = settings.feature_repo_dir
    (repo / "data" / "offline").mkdir(parents=True, exist_ok=True)
    s = settings
    pg = sa.engine.make_url(_sa_url(s.postgres_url))
    pg_url = pg.render_as_string(hide_password=False)
    if pg.password:  # the file gets references, not the secret: Feast expands ${VARS} when it reads it
        from urllib.parse import quote

        os.environ[PG_PASSWORD_ENV] = pg.password
        os.environ[PG_PASSWORD_ENV + "_URL"] = quote(pg.password, safe="")
        pg_url = pg.set(password="PASSWORD").render_as_string(hide_password=False).replace(
            ":PASSWORD@", ":${" + PG_PASSWORD_ENV + "_URL}@", 1)
        pg = pg.set(password="${" + PG_PASSWORD_ENV + "}")
    lines = [f"project: {s.feast_project}", "provider: local"]
    if s.feast_registry == "sql":
        lines += ["registry:", "  registry_type: sql", f"  path: {pg_url}", "  cache_ttl_seconds: 60",
                  "  sqlalchemy_config_kwargs:", "    pool_pre_ping: true"]
    else:
        lines += ["registry: data/registry.db"]
    if s.feast_online == "redis":
        lines += ["online_store:", "  type: redis", f"  connection_string: \"{redis_connection_string(s.redis_url)}\""]
    else:
        lines += ["online_store:", "  type: sqlite", "  path: data/online_store.db"]
    if s.feast_offline == "postgres":
        u = pg
        lines += ["offline_store:", "  type: postgres", f"  host: {u.host or '127.0.0.1'}", f"  port: {u.port or 5432}",
                  f"  database: {u.database or 'postgres'}", "  db_schema: public", f"  user: {u.username or 'postgres'}",
                  f"  password: \"{u.password or ''}\"", "  sslmode: disable"]
    else:
        lines += ["offline_store:", "  type: file"]
    lines += ["entity_key_serialization_version: 3"]
    files = {
        "feature_store.yaml": "\n".join(lines) + "\n",
        "definitions.py": (REPO_TEMPLATE / "definitions.py").read_text(),
        "semalign_repo.json": json.dumps({"levels": levels, "offline": s.feast_offline,
                                          "table_prefix": s.feast_project}, indent=2) + "\n",
    }
    for name, text in files.items():
        p = repo / name
        if not p.exists() or p.read_text() != text:
            atomic.write_text(p, text)
    return repo


@dataclass
class PublishResult:
    version: str
    items: int
    published: bool        # False: this exact version was already published (nothing written)
    current: str | None
    wall_s: float


class SemanticIdStore:
    def __init__(self, settings: Settings, levels: int | None = None):
        self.settings = settings
        self.project = settings.feast_project
        settings.home.mkdir(parents=True, exist_ok=True)
        self.state = state.engine(settings.resolved_state_url())
        self.levels = levels or settings.codebook_levels
        self.repo = render_repo(settings, self.levels)
        self._fs = None
        self._views = {}
        self._onboarders = {}
        self._published_rows: dict[str, dict] = {}

    # ------------------------------------------------------------------ feast plumbing
    @property
    def fs(self):
        if self._fs is None:
            import feast

            try:
                with reaching("the feature store registry"):
                    self._fs = feast.FeatureStore(repo_path=str(self.repo))
                    self._ensure_applied()
            except Exception:
                self._fs = None  # the next call tries again
                raise
        return self._fs

    def _definitions(self) -> dict:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"semalign_feast_defs_{self.project}", self.repo / "definitions.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.__dict__

    def _ensure_applied(self):
        from feast import Entity, FeatureService, FeatureView, PushSource

        fs = self._fs
        try:
            have = {fv.name: fv for fv in fs.list_feature_views()}
        except Exception:
            have = {}
        sid, emb = have.get(SID_VIEW), have.get(EMB_VIEW)
        # a project applied before the embedding view gained `content` is re-applied (Feast adds the field)
        current = emb is not None and "content" in {f.name for f in emb.features}
        if sid is not None and sid.tags.get("levels") == str(self.levels) and current and USER_VIEW in have:
            return
        if sid is not None and sid.tags.get("levels") != str(self.levels):
            raise FeatureStoreError(f"the feature view {SID_VIEW} in project '{self.project}' has "
                                    f"{sid.tags.get('levels')} levels, not {self.levels}; use another project "
                                    "(SEMALIGN_FEAST_PROJECT) for codebooks of a different depth")
        objs = [o for o in self._definitions().values() if isinstance(o, (Entity, FeatureView, FeatureService, PushSource))]
        if self.settings.feast_offline == "postgres":
            self._pg_create_tables()
        fs.apply(objs)

    def view(self, name: str):
        if name not in self._views:
            self._views[name] = self.fs.get_feature_view(name)
        return self._views[name]

    # ------------------------------------------------------------------ offline writes (atomic per call)
    def _offline_dir(self, view: str) -> Path:
        return self.repo / "data" / "offline" / view

    def _pg_engine(self):
        return state.engine(_sa_url(self.settings.postgres_url))

    def _pg_create_tables(self):
        from sqlalchemy.dialects import postgresql as pg

        cols = {
            SID_VIEW: [sa.Column(f"sid_{lvl}", sa.BigInteger) for lvl in range(self.levels)] + [sa.Column("sid_dedup", sa.BigInteger)],
            EMB_VIEW: [sa.Column("embedding", pg.ARRAY(sa.Float(precision=24))),
                       sa.Column("content", pg.ARRAY(sa.Float(precision=24)))],
            USER_VIEW: [sa.Column("recent_items", pg.ARRAY(sa.Text)), sa.Column("n_events", sa.BigInteger),
                        sa.Column("positive_rate", sa.Float(precision=24))],
        }
        md = sa.MetaData()
        for view, extra in cols.items():
            keys = [sa.Column("user_id", sa.Text)] if view == USER_VIEW else \
                [sa.Column("item_id", sa.Text), sa.Column("codebook_version", sa.Text)]
            sa.Table(f"{self.project}_{view}", md, *keys, *extra,
                     sa.Column("event_timestamp", sa.DateTime(timezone=True)),
                     sa.Column("created", sa.DateTime(timezone=True)), sa.Column("batch", sa.Text))
        with reaching("the Postgres offline store"):
            eng = self._pg_engine()
            md.create_all(eng)
            emb_table = f"{self.project}_{EMB_VIEW}"
            if "content" not in {c["name"] for c in sa.inspect(eng).get_columns(emb_table)}:
                with eng.begin() as c:  # a table created before the embedding view gained `content`
                    c.execute(sa.text(f'ALTER TABLE "{emb_table}" ADD COLUMN IF NOT EXISTS content real[]'))
        return md

    def _write_offline(self, frames: dict[str, pd.DataFrame], batch: str):
        """Writes one batch (a version's publish or one onboarding call) to every view at once: parquet files
        renamed into place, or one Postgres transaction. Re-writing the same batch replaces it."""
        if self.settings.feast_offline == "postgres":
            md = self._pg_create_tables()
            with reaching("the Postgres offline store"):
                with self._pg_engine().begin() as conn:
                    for view, df in frames.items():
                        t = md.tables[f"{self.project}_{view}"]
                        conn.execute(t.delete().where(t.c.batch == batch))
                        rows = df.assign(batch=batch)
                        rows = rows.assign(**{c: rows[c].map(lambda v: [float(x) for x in v])
                                              for c in ("embedding", "content") if c in rows})
                        conn.execute(t.insert(), rows.to_dict("records"))
            return
        staged = []
        for view, df in frames.items():
            d = self._offline_dir(view)
            d.mkdir(parents=True, exist_ok=True)
            tmp = atomic.temp_sibling(d / f"{batch}.parquet")
            df.assign(batch=batch).to_parquet(tmp, index=False)
            staged.append((tmp, d / f"{batch}.parquet"))
        for tmp, final in staged:  # renames last, so a crash before them leaves nothing visible
            os.replace(tmp, final)

    def _write_online(self, frames: dict[str, pd.DataFrame], chunk: int = 20000, between=None):
        with reaching(f"the {self.settings.feast_online} online store"):
            for view, df in frames.items():
                for i in range(0, len(df), chunk):
                    self.fs.write_to_online_store(view, df.iloc[i:i + chunk])
                    if between is not None:
                        between()

    # ------------------------------------------------------------------ catalogue
    def versions(self) -> list[dict]:
        with self.state.connect() as c:
            rows = c.execute(sa.select(state.codebook_versions).where(
                state.codebook_versions.c.project == self.project).order_by(state.codebook_versions.c.started_at))
            return [dict(r._mapping) for r in rows]

    def current_version(self) -> str | None:
        return state.get_pointer(self.state, self.project, CURRENT)

    def set_current(self, version: str, reason: str = "", actor: str | None = None) -> str | None:
        self._published(version)
        with self.state.begin() as c:
            old = state.move_pointer(c, self.project, CURRENT, version, reason=reason, actor=actor)
        return old

    def _version_row(self, version: str) -> dict | None:
        with self.state.connect() as c:
            r = c.execute(sa.select(state.codebook_versions).where(
                state.codebook_versions.c.project == self.project,
                state.codebook_versions.c.version == version)).first()
        return dict(r._mapping) if r else None

    def _published(self, version: str | None) -> dict:
        if version is None:
            version = self.current_version()
            if version is None:
                raise UnknownVersionError(f"no codebook version is published in project '{self.project}' yet "
                                          "(run `semalign ids publish` or `semalign run`)")
        if version in self._published_rows:  # a published version never changes
            return self._published_rows[version]
        row = self._version_row(version)
        if row is not None and row["status"] == "published":
            self._published_rows[version] = row
            return row
        if row is None or row["status"] != "published":
            known = [v["version"] for v in self.versions() if v["status"] == "published"]
            why = "is still being published (or its publish was interrupted)" if row else "is unknown"
            raise UnknownVersionError(f"codebook version '{version}' {why} in project '{self.project}' "
                                      f"(published: {known or 'none'})")
        return row

    # ------------------------------------------------------------------ publish
    def publish(self, codebook, item_ids, embeddings, encoder_version: str | None = None,
                available_at=None, make_current: bool = True, content=None) -> PublishResult:
        """Assigns every item its SID under `codebook` and publishes version `codebook.version` offline and
        online, with `content` (the frozen text-tower vectors, [n, dt]) beside the aligned vectors where given.
        Idempotent: the same version with the same content is a no-op; different content under an already
        published version is refused (versions are immutable)."""
        from semalign.models.quantizer import dedup_level

        t0 = time.perf_counter()
        item_ids = [str(i) for i in item_ids]
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != codebook.dim:
            raise ValueError(f"embeddings for codebook {codebook.version} must have width {codebook.dim}; "
                             f"got shape {tuple(emb.shape)}; nothing was published")
        if len(item_ids) != len(emb):
            raise ValueError(f"{len(item_ids)} item ids but {len(emb)} embeddings; nothing was published")
        raw = _content_vectors(content, len(item_ids), "nothing was published")
        dup = pd.Index(item_ids)[pd.Index(item_ids).duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"duplicate item ids {dup[:5]}; nothing was published")
        if codebook.levels != self.levels:
            raise FeatureStoreError(f"codebook {codebook.version} has {codebook.levels} levels; this store's "
                                    f"feature view has {self.levels}")
        codes = codebook.assign(emb)  # validates finiteness too
        tie = np.argsort(np.argsort(np.array(item_ids, dtype=object), kind="stable"), kind="stable")
        dedup = dedup_level(codes, tie_order=tie)
        # the text-tower vectors follow from the items' texts like `emb` does: not part of the version's identity,
        # so re-publishing a version with or without them is a no-op
        content_hash = _content_hash(codebook.version, item_ids, codes, dedup, emb)
        version = codebook.version

        folder = self.settings.codebooks_dir / version
        if not (folder / "codebook.json").exists():  # onboarding in any process needs the pinned codebook
            with atomic.building(folder) as tmp:
                codebook.save(tmp)
                if encoder_version:
                    (tmp / "lineage.json").write_text(json.dumps({"encoder_version": encoder_version, "rotated": False}))
        row = self._version_row(version)
        if row is not None and row["status"] == "published":
            if row["content_hash"] != content_hash:
                raise FeatureStoreError(f"codebook version {version} is already published with different content "
                                        f"({row['n_items']} items, hash {row['content_hash']}); versions are "
                                        "immutable: build a new codebook version instead")
            cur = self.current_version()
            if make_current and cur != version:
                self.set_current(version, reason="re-publish")
            return PublishResult(version, len(item_ids), False, self.current_version(), time.perf_counter() - t0)

        now = time.time()
        with self.state.begin() as c:  # 1. the version exists but is not readable yet
            c.execute(state.item_sids.delete().where(state.item_sids.c.project == self.project,
                                                     state.item_sids.c.version == version))
            vals = dict(parent=codebook.parent, encoder_version=encoder_version, data_hash=codebook.data_hash,
                        levels=codebook.levels, dim=codebook.dim, n_items=len(item_ids), content_hash=content_hash,
                        status="publishing", started_at=now, published_at=None)
            if row is None:
                c.execute(state.codebook_versions.insert().values(project=self.project, version=version, **vals))
            else:
                c.execute(state.codebook_versions.update().where(
                    state.codebook_versions.c.project == self.project,
                    state.codebook_versions.c.version == version).values(**vals))
            keys = _sid_keys(codes)
            c.execute(state.item_sids.insert(), [
                {"project": self.project, "version": version, "item_id": i, "sid_key": k, "dedup": int(d),
                 "source": "batch", "created_at": now} for i, k, d in zip(item_ids, keys, dedup)])

        ts = _timestamps(available_at, len(item_ids))
        frames = self._frames(version, item_ids, codes, dedup, emb, raw, ts,
                              pd.Timestamp(now, unit="s", tz="UTC").floor("us"))
        self._write_offline(frames, batch=f"{version}")          # 2. offline (atomic per store)
        checkpoint("publish.after_offline")
        self._write_online(frames, between=lambda: checkpoint("publish.online"))  # 3. online
        with self.state.begin() as c:                            # 4. readable from here on
            c.execute(state.codebook_versions.update().where(
                state.codebook_versions.c.project == self.project, state.codebook_versions.c.version == version)
                .values(status="published", published_at=time.time()))
        if make_current:
            self.set_current(version, reason="publish")
        return PublishResult(version, len(item_ids), True, self.current_version(), time.perf_counter() - t0)

    def _frames(self, version, item_ids, codes, dedup, emb, raw, event_ts, created) -> dict[str, pd.DataFrame]:
        base = pd.DataFrame({"item_id": item_ids, "codebook_version": version})
        sid = base.copy()
        for lvl in range(codes.shape[1]):
            sid[f"sid_{lvl}"] = codes[:, lvl].astype(np.int64)
        sid["sid_dedup"] = np.asarray(dedup, dtype=np.int64)
        sid["event_timestamp"] = event_ts
        sid["created"] = created
        e = base.copy()
        e["embedding"] = list(emb.astype(np.float32))
        e["content"] = [np.zeros(0, np.float32)] * len(e) if raw is None else list(raw)
        e["event_timestamp"] = event_ts
        e["created"] = created
        return {SID_VIEW: sid, EMB_VIEW: e}

    # ------------------------------------------------------------------ reads
    def semantic_ids(self, item_ids, version: str | None = None, with_embedding: bool = False,
                     strict: bool = True) -> pd.DataFrame:
        """Online read for one codebook version (default: the current one). One row per item, in order:
        item_id, codebook_version, sid_0..sid_{L-1}, sid_dedup (and embedding). Items the store does not hold
        raise ItemsNotFoundError, or with strict=False come back with `found` False and SIDs of -1."""
        row = self._published(version)
        version, levels = row["version"], row["levels"]
        item_ids = [str(i) for i in item_ids]
        codes, found, emb, _ = self.read_online(item_ids, version, levels, with_embedding)
        if strict and not found.all():
            raise ItemsNotFoundError(version, [i for i, f in zip(item_ids, found) if not f])
        cols = {"item_id": item_ids, "codebook_version": [version] * len(item_ids)}
        cols.update({f"sid_{lvl}": codes[:, lvl] for lvl in range(levels)})
        cols["sid_dedup"] = codes[:, levels]
        if with_embedding:
            cols["embedding"] = emb
        if not strict:
            cols["found"] = found
        return pd.DataFrame(cols)

    def read_online(self, item_ids: list[str], version: str, levels: int, with_embedding: bool = False,
                    with_content: bool = False):
        """The hot path under `semantic_ids` and serving (feature_repo/online.py). The caller has checked that
        `version` is published. Returns (codes [n, levels+1] with -1 where missing, found, emb, content): emb and
        content are lists of vectors (None where missing; content is empty where the version was published
        without it), or None when not asked for."""
        from semalign.feature_repo.online import read_items

        fs = self.fs
        with reaching(f"the {self.settings.feast_online} online store"):
            return read_items(fs, self.view(SID_VIEW), self.view(EMB_VIEW), item_ids, version, levels,
                              with_embedding, with_content)

    def historical(self, frame: pd.DataFrame, version: str | None = None, with_embedding: bool = False) -> pd.DataFrame:
        """Point-in-time join: `frame` has item_id and event_timestamp (and optionally codebook_version); each row
        gets the SID its item had under the pinned version at that time (null before the item was published
        or onboarded into that version)."""
        if "item_id" not in frame or "event_timestamp" not in frame:
            raise ValueError("the frame needs columns item_id and event_timestamp")
        ent = frame.copy()
        if "codebook_version" not in ent:
            ent["codebook_version"] = self._published(version)["version"]
        for v in ent["codebook_version"].unique():
            self._published(v)
        ent["item_id"] = ent["item_id"].astype(str)
        ent["event_timestamp"] = pd.to_datetime(ent["event_timestamp"], utc=True)
        row = self._published(ent["codebook_version"].iloc[0]) if len(ent) else {"levels": self.levels}
        feats = [f"{SID_VIEW}:sid_{lvl}" for lvl in range(row["levels"])] + [f"{SID_VIEW}:sid_dedup"]
        if with_embedding:
            feats.append(f"{EMB_VIEW}:embedding")
        ent["_row"] = np.arange(len(ent))
        feat_cols = [f.split(":")[1] for f in feats]
        # rows whose item a version never held are null without asking Feast (its file store fails on a join
        # where nothing matches); the rest go through the point-in-time join
        t = state.item_sids
        held = set()
        with self.state.connect() as c:
            for v in ent["codebook_version"].unique():
                held.update((v, r[0]) for r in c.execute(sa.select(t.c.item_id).where(
                    t.c.project == self.project, t.c.version == v)))
        mask = np.array([(v, i) in held for v, i in zip(ent["codebook_version"], ent["item_id"])], bool)
        with reaching(f"the {self.settings.feast_offline} offline store"):
            got = self.fs.get_historical_features(entity_df=ent[mask], features=feats).to_df() if mask.any() \
                else pd.DataFrame(columns=["_row"] + feat_cols)
        # one output row per input row, in input order (the file store also drops rows that match nothing)
        return ent.merge(got[["_row"] + feat_cols], on="_row", how="left").drop(columns="_row")

    # ------------------------------------------------------------------ onboarding
    def onboard(self, items: pd.DataFrame, version: str | None = None, embeddings: np.ndarray | None = None) -> pd.DataFrame:
        """New items -> aligned vectors (encoder of the pinned codebook, or `embeddings` given) -> SIDs with the
        pinned codebook -> online and offline in one call. Items the version already holds keep their SIDs."""
        row = self._published(version)
        version = row["version"]
        if "item_id" not in items:
            raise ValueError("items need an item_id column (and text, optionally image_path)")
        items = items.copy()
        items["item_id"] = items["item_id"].astype(str)
        if items["item_id"].duplicated().any():
            raise ValueError(f"duplicate item ids in the onboarding batch: "
                             f"{items.loc[items['item_id'].duplicated(), 'item_id'].tolist()[:5]}")
        ob = self._onboarder(version, row)
        raw = None
        if embeddings is None:
            emb, raw = ob.embed(items)
        else:
            emb = np.asarray(embeddings, dtype=np.float32)
            if emb.ndim != 2 or emb.shape != (len(items), row["dim"]):
                raise ValueError(f"embeddings for codebook {version} must have shape ({len(items)}, {row['dim']}); "
                                 f"got {tuple(emb.shape)}; nothing was onboarded")
        codes = ob.codebook.assign(emb)
        keys = _sid_keys(codes)
        ids = items["item_id"].tolist()
        now = time.time()
        dedup = np.zeros(len(ids), np.int64)
        fresh = np.ones(len(ids), bool)
        t = state.item_sids
        with self.state.begin() as c:
            existing = {r.item_id: r for r in c.execute(sa.select(t).where(
                t.c.project == self.project, t.c.version == version, t.c.item_id.in_(ids)))}
            want_keys = sorted(set(keys))
            taken: dict[str, set] = {}
            for r in c.execute(sa.select(t.c.sid_key, t.c.dedup).where(
                    t.c.project == self.project, t.c.version == version, t.c.sid_key.in_(want_keys))):
                taken.setdefault(r.sid_key, set()).add(r.dedup)
            new_rows = []
            for j, (iid, k) in enumerate(zip(ids, keys)):
                if iid in existing:
                    fresh[j] = False
                    old = existing[iid]
                    codes[j] = [int(x) for x in old.sid_key.split("-")]
                    dedup[j] = old.dedup
                    continue
                used = taken.setdefault(k, set())
                d = 0
                while d in used:
                    d += 1
                used.add(d)
                dedup[j] = d
                new_rows.append({"project": self.project, "version": version, "item_id": iid, "sid_key": k,
                                 "dedup": d, "source": "onboard", "created_at": now})
            if new_rows:
                # the unique (version, sid_key, dedup) constraint makes a racing onboarder fail here, not collide
                c.execute(t.insert(), new_rows)
            if fresh.any():
                ts = pd.Timestamp(now, unit="s", tz="UTC").floor("us")
                sel = np.flatnonzero(fresh)
                frames = self._frames(version, [ids[j] for j in sel], codes[sel], dedup[sel], emb[sel],
                                      None if raw is None else raw[sel], ts, ts)
                batch = f"{version}-onboard-{int(now * 1e6)}-{os.getpid()}"
                self._push_online(frames)
                self._write_offline(frames, batch=batch)
        out = pd.DataFrame({"item_id": ids, "codebook_version": version})
        for lvl in range(codes.shape[1]):
            out[f"sid_{lvl}"] = codes[:, lvl]
        out["sid_dedup"] = dedup
        out["onboarded"] = fresh
        return out

    def encode(self, items: pd.DataFrame, version: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SIDs [n, levels] (no dedup level), aligned vectors and text-tower vectors for items' content under a
        published version, without writing anything: what serving does for candidates it is not asked to onboard."""
        row = self._published(version)
        ob = self._onboarder(row["version"], row)
        emb, raw = ob.embed(items)
        return ob.codebook.assign(emb), emb, raw

    def _push_online(self, frames: dict[str, pd.DataFrame]):
        from feast.data_source import PushMode

        with reaching(f"the {self.settings.feast_online} online store"):
            for view, df in frames.items():
                self.fs.push(f"{view}_push", df, to=PushMode.ONLINE)

    def _onboarder(self, version: str, row: dict) -> "_Onboarder":
        if version not in self._onboarders:
            self._onboarders[version] = _Onboarder(self.settings, version, row.get("encoder_version"))
        return self._onboarders[version]

    # ------------------------------------------------------------------ users and ranker services
    def publish_users(self, frame: pd.DataFrame, batch: str) -> int:
        """frame: user_id, recent_items (list of item ids, newest last), n_events, positive_rate, event_timestamp."""
        df = frame.copy()
        df["user_id"] = df["user_id"].astype(str)
        df["created"] = pd.Timestamp.now(tz="UTC")
        self._write_offline({USER_VIEW: df}, batch=f"users-{batch}")
        self._write_online({USER_VIEW: df})
        return len(df)

    def users_online(self, user_ids: list[str]) -> list[dict | None]:
        """Each user's recent items and activity from the online store (None for users it does not hold)."""
        from semalign.feature_repo.online import read_users

        fs = self.fs
        with reaching(f"the {self.settings.feast_online} online store"):
            return read_users(fs, self.view(USER_VIEW), user_ids)

    def register_ranker_service(self, name: str, codebook_version: str, tags: dict | None = None) -> str:
        """One feature service per ranker version, tagged with the codebook version its readers must pin."""
        from feast import FeatureService

        self._published(codebook_version)
        svc = FeatureService(name=name, features=[self.view(SID_VIEW), self.view(EMB_VIEW), self.view(USER_VIEW)],
                             tags={"codebook_version": codebook_version, **(tags or {})},
                             description=f"Features of ranker {name}; pin codebook_version={codebook_version}.")
        self.fs.apply([svc])
        return name

    def service_version(self, name: str) -> str:
        return self.fs.get_feature_service(name).tags["codebook_version"]


class _Onboarder:
    """Holds the towers, the encoder and the codebook of one version, so one new item costs one forward pass."""

    def __init__(self, settings: Settings, version: str, encoder_version: str | None):
        from semalign.models.quantizer import Codebook

        folder = settings.codebooks_dir / version
        self.codebook = Codebook.load(folder)
        lineage = json.loads((folder / "lineage.json").read_text()) if (folder / "lineage.json").exists() else {}
        self.encoder_version = encoder_version or lineage.get("encoder_version")
        self.rotation = np.load(folder / "rotation.npy", allow_pickle=False) if (folder / "rotation.npy").exists() else None
        self.settings = settings
        self._text = self._image = self._encoder = None

    def embed(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(aligned vectors [n, d], text-tower vectors [n, dt]) of items' content."""
        from semalign.models.encoder import embed_items, load_encoder
        from semalign.models.towers import ImageTower, TextTower

        if self.encoder_version is None:
            raise FeatureStoreError(f"codebook {self.codebook.version} does not record its encoder; pass embeddings")
        text = items["text"] if "text" in items else pd.Series(None, index=items.index, dtype=object)
        empty = text.isna() | (text.astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"onboarding needs a non-empty 'text' for every item; missing for "
                             f"{items.loc[empty, 'item_id'].tolist()[:5]}")
        dev = self.settings.resolved_device()
        if self._encoder is None:
            self._encoder, _ = load_encoder(self.settings.encoders_dir / self.encoder_version, dev)
            self._text = TextTower(self.settings.resolved_text_model(), device=dev)
        text = self._text.encode(items["text"].astype(str).tolist())
        image, has_image = None, np.zeros(len(items), bool)
        if self._encoder.cfg.image_dim:
            image = np.zeros((len(items), self._encoder.cfg.image_dim), np.float32)
            paths = items["image_path"].tolist() if "image_path" in items else [None] * len(items)
            if self.settings.use_images and any(p for p in paths if isinstance(p, str)):
                self._image = self._image or ImageTower(device=dev)
                sel = [j for j, p in enumerate(paths) if isinstance(p, str) and p]
                vec, ok = self._image.encode([paths[j] for j in sel])
                image[sel] = vec
                has_image[sel] = ok
        emb = embed_items(self._encoder, text, image, has_image, dev)
        if self.rotation is not None:
            emb = (emb @ self.rotation).astype(np.float32)
        return emb, np.asarray(text, np.float32)


def _sid_keys(codes: np.ndarray) -> list[str]:
    return ["-".join(map(str, r)) for r in codes.tolist()]


def _content_hash(version, item_ids, codes, dedup, emb) -> str:
    h = hashlib.sha256(version.encode())
    h.update("\0".join(item_ids).encode())
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(dedup, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _content_vectors(content, n: int, outcome: str) -> np.ndarray | None:
    """Validated text-tower vectors [n, dt] (float32, finite), or None."""
    if content is None:
        return None
    raw = np.asarray(content, dtype=np.float32)
    if raw.ndim != 2 or len(raw) != n or raw.shape[1] == 0:
        raise ValueError(f"content vectors must have shape ({n}, dim); got {tuple(raw.shape)}; {outcome}")
    if not np.isfinite(raw).all():
        bad = int(np.flatnonzero(~np.isfinite(raw).all(1))[0])
        raise ValueError(f"content vector of row {bad} is not finite; {outcome}")
    return raw


def _timestamps(available_at, n: int) -> pd.Series:
    if available_at is None:
        return pd.Series([EPOCH] * n)
    ts = pd.to_datetime(pd.Series(list(available_at)), utc=True)
    if len(ts) != n:
        raise ValueError(f"available_at has {len(ts)} values for {n} items")
    return ts.fillna(EPOCH)


