"""The codebook catalogue in semalign's state tables: which versions exist and which are published (readable),
every item's SID slot per version, and the current-version pointer with its audit rows. The only module that
reads or moves that pointer: the store's `set_current` and the registry's promotions go through here."""
from __future__ import annotations

import time

import numpy as np
import sqlalchemy as sa

from semalign import state
from semalign.errors import ConflictError
from semalign.feature_repo.errors import UnknownVersionError

CURRENT = "current_codebook"
PENDING = "pending"   # an onboarding slot reserved, its rows not yet confirmed in both stores


def sid_keys(codes: np.ndarray) -> list[str]:
    """"c0-c1-c2" per row: a SID without its dedup level."""
    return ["-".join(map(str, r)) for r in np.asarray(codes).tolist()]


def key_codes(sid_key: str) -> list[int]:
    """The codes of a `sid_keys` string."""
    return [int(x) for x in sid_key.split("-")]


class CodebookCatalogue:
    def __init__(self, engine: sa.Engine, project: str):
        self.engine, self.project = engine, project
        self._published: dict[str, dict] = {}  # a published version never changes

    # ------------------------------------------------------------------ versions
    def versions(self) -> list[dict]:
        t = state.codebook_versions
        with self.engine.connect() as c:
            rows = c.execute(sa.select(t).where(t.c.project == self.project).order_by(t.c.started_at))
            return [dict(r._mapping) for r in rows]

    def row(self, version: str) -> dict | None:
        t = state.codebook_versions
        with self.engine.connect() as c:
            r = c.execute(sa.select(t).where(t.c.project == self.project, t.c.version == version)).first()
        return dict(r._mapping) if r else None

    def published(self, version: str | None) -> dict:
        """The catalogue row of a published version (default: the current one); UnknownVersionError otherwise."""
        if version is None:
            version = self.current()
            if version is None:
                raise UnknownVersionError(f"no codebook version is published in project '{self.project}' yet "
                                          "(run `semalign ids publish` or `semalign run`)")
        if version in self._published:
            return self._published[version]
        row = self.row(version)
        if row is not None and row["status"] == "published":
            self._published[version] = row
            return row
        known = [v["version"] for v in self.versions() if v["status"] == "published"]
        why = "is still being published (or its publish was interrupted)" if row else "is unknown"
        raise UnknownVersionError(f"codebook version '{version}' {why} in project '{self.project}' "
                                  f"(published: {known or 'none'})")

    def begin_publish(self, version: str, values: dict, item_ids: list[str], keys: list[str], dedup) -> None:
        """Step 1 of a publish: the version and its items' slots exist, not readable yet."""
        t, v = state.item_sids, state.codebook_versions
        now = time.time()
        with self.engine.begin() as c:
            c.execute(t.delete().where(t.c.project == self.project, t.c.version == version))
            vals = dict(values, status="publishing", started_at=now, published_at=None)
            if c.execute(sa.select(v.c.version).where(v.c.project == self.project, v.c.version == version)).first():
                c.execute(v.update().where(v.c.project == self.project, v.c.version == version).values(**vals))
            else:
                c.execute(v.insert().values(project=self.project, version=version, **vals))
            c.execute(t.insert(), [{"project": self.project, "version": version, "item_id": i, "sid_key": k,
                                    "dedup": int(d), "source": "batch", "created_at": now}
                                   for i, k, d in zip(item_ids, keys, dedup)])

    def finish_publish(self, version: str) -> None:
        """The last step of a publish: readable from here on."""
        v = state.codebook_versions
        with self.engine.begin() as c:
            c.execute(v.update().where(v.c.project == self.project, v.c.version == version)
                      .values(status="published", published_at=time.time()))

    # ------------------------------------------------------------------ item slots
    def held(self, versions) -> set[tuple[str, str]]:
        """(version, item_id) of every item the versions hold."""
        t = state.item_sids
        out = set()
        with self.engine.connect() as c:
            for v in versions:
                out.update((v, r[0]) for r in c.execute(sa.select(t.c.item_id).where(
                    t.c.project == self.project, t.c.version == v)))
        return out

    def onboarded_items(self, version: str) -> list[str]:
        """Items onboarded (confirmed) into a version, as opposed to published with it."""
        t = state.item_sids
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(sa.select(t.c.item_id).where(
                t.c.project == self.project, t.c.version == version, t.c.source == "onboard"))]

    def reserve(self, version: str, ids: list[str], codes: np.ndarray, attempts: int = 6):
        """Step 1 of onboarding: slots for the items, committed as `pending` before anything is written to the
        stores, so a slot is never handed out twice even if the writer dies before confirming. Items the version
        holds confirmed keep their SID and are not written again. A pending slot (left by a writer that died or is
        still writing) is written again: kept where the content gets the same codes, else given up for a slot of
        the new content's codes, so the SID written always belongs to the vectors written with it. A racing
        onboarder's conflict on the unique slot or item key is retried with what it committed. Returns (codes,
        dedup, write [n] bool, fresh [n] bool)."""
        for attempt in range(attempts):
            try:
                with self.engine.begin() as c:
                    return self._allocate(c, version, ids, np.array(codes, copy=True))
            except sa.exc.IntegrityError:
                if attempt == attempts - 1:
                    raise ConflictError(f"onboarding into {version} kept colliding with concurrent onboarders "
                                        f"({attempts} attempts); nothing was onboarded, try again") from None
                time.sleep(0.02 * (attempt + 1))

    def confirm(self, version: str, ids: list[str], actor: str | None = None) -> None:
        """The last step of onboarding: the items' rows are in both stores. Audited (`onboard`: how many items,
        the first ids), in the same transaction."""
        t = state.item_sids
        with self.engine.begin() as c:
            c.execute(t.update().where(t.c.project == self.project, t.c.version == version, t.c.item_id.in_(ids),
                                       t.c.source == PENDING).values(source="onboard"))
            shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
            state.record(c, self.project, "onboard", f"codebook:{version}"[:128],
                         f"{len(ids)} item{'' if len(ids) == 1 else 's'}",
                         reason=f"items: {shown}", actor=actor)

    def _allocate(self, conn: sa.Connection, version: str, ids: list[str], codes: np.ndarray):
        t = state.item_sids
        keys = sid_keys(codes)
        dedup = np.zeros(len(ids), np.int64)
        fresh, write = np.ones(len(ids), bool), np.ones(len(ids), bool)
        existing = {r.item_id: r for r in conn.execute(sa.select(t).where(
            t.c.project == self.project, t.c.version == version, t.c.item_id.in_(ids)))}
        # a pending slot of other codes than this content's: given up (nothing served it), a new one reserved
        stale = [i for i, k in zip(ids, keys) if i in existing and existing[i].source == PENDING
                 and existing[i].sid_key != k]
        if stale:
            conn.execute(t.delete().where(t.c.project == self.project, t.c.version == version,
                                          t.c.item_id.in_(stale), t.c.source == PENDING))
            for i in stale:
                del existing[i]
        taken: dict[str, set] = {}
        for r in conn.execute(sa.select(t.c.sid_key, t.c.dedup).where(
                t.c.project == self.project, t.c.version == version, t.c.sid_key.in_(sorted(set(keys))))):
            taken.setdefault(r.sid_key, set()).add(r.dedup)
        now, new_rows = time.time(), []
        for j, (iid, k) in enumerate(zip(ids, keys)):
            if iid in existing:
                old = existing[iid]
                fresh[j], write[j] = False, old.source == PENDING
                codes[j] = key_codes(old.sid_key)
                dedup[j] = old.dedup
                continue
            used = taken.setdefault(k, set())
            d = 0
            while d in used:
                d += 1
            used.add(d)
            dedup[j] = d
            new_rows.append({"project": self.project, "version": version, "item_id": iid, "sid_key": k,
                             "dedup": d, "source": PENDING, "created_at": now})
        if new_rows:
            conn.execute(t.insert(), new_rows)
        return codes, dedup, write, fresh

    def slots(self, version: str, prefix: str | None = None, limit: int | None = None) -> list[dict]:
        """Confirmed items of a version with their SIDs (item_id, sid_key, dedup, source), ordered by SID; with
        `prefix` ("c0" or "c0-c1", codes without the dedup level) only the items whose SID starts with it."""
        t = state.item_sids
        q = sa.select(t.c.item_id, t.c.sid_key, t.c.dedup, t.c.source).where(
            t.c.project == self.project, t.c.version == version, t.c.source != PENDING)
        if prefix is not None:
            q = q.where(sa.or_(t.c.sid_key == prefix, t.c.sid_key.like(prefix + "-%")))
        q = q.order_by(t.c.sid_key, t.c.dedup, t.c.item_id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def sid_table(self, version: str, levels: int) -> tuple[list[str], np.ndarray]:
        """Every confirmed item of a version and its full SID: (item ids, codes [n, levels + 1], dedup last)."""
        rows = self.slots(version)
        codes = np.array([key_codes(r["sid_key"]) + [r["dedup"]] for r in rows], np.int64)
        return [r["item_id"] for r in rows], codes.reshape(len(rows), levels + 1)

    # ------------------------------------------------------------------ the current pointer
    def current(self) -> str | None:
        return state.get_pointer(self.engine, self.project, CURRENT)

    def set_current(self, version: str, reason: str = "", actor: str | None = None) -> str | None:
        """Makes a published version the one unpinned readers get; audited; returns the previous one."""
        self.published(version)
        with self.engine.begin() as c:
            return self.move_current(c, version, reason=reason, actor=actor)

    def move_current(self, conn: sa.Connection, version: str, reason: str, actor: str | None = None) -> str | None:
        """Moves the pointer inside the caller's transaction (a promotion moves it with its own audit row)."""
        return state.move_pointer(conn, self.project, CURRENT, version, reason=reason, actor=actor)
