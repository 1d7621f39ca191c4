"""Feature-store conformance: one suite, run against the embedded store (sqlite online, parquet offline, file
registry) and against the real Redis online store + Postgres offline store + SQL registry on this machine."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semalign.config import Settings
from semalign.models.codebook import build_codebook
from semalign.models.sids import dedup_level

REDIS = os.environ.get("SEMALIGN_TEST_REDIS", "127.0.0.1:6379")
POSTGRES = os.environ.get("SEMALIGN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = {
    "sqlite": {},
    "redis-postgres": {"feast_online": "redis", "feast_offline": "postgres", "feast_registry": "sql",
                       "redis_url": REDIS, "postgres_url": POSTGRES},
}


def _server_up(backend: str) -> bool:
    if backend == "sqlite":
        return True
    import socket

    for hostport in (REDIS.split(",")[0], "127.0.0.1:5432"):
        host, port = hostport.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return False
    return True


def make_settings(home: Path, backend: str, project: str) -> Settings:
    return Settings(home=home, feast_project=project, **BACKENDS[backend])


@pytest.fixture(scope="module", params=list(BACKENDS))
def env(request, tmp_path_factory):
    """One applied store per backend for the module (apply is the slow part); each test uses its own versions."""
    backend = request.param
    if not _server_up(backend):
        pytest.fail(f"{backend}: Redis/Postgres not reachable on loopback (.ci/run starts them)")
    from semalign.feature_repo.store import SemanticIdStore

    project = f"t{uuid.uuid4().hex[:10]}"
    home = tmp_path_factory.mktemp(f"fs-{backend}")
    settings = make_settings(home, backend, project)
    store = SemanticIdStore(settings)
    store.fs  # renders + applies
    yield {"backend": backend, "settings": settings, "store": store, "home": home, "project": project}
    try:
        store.fs.teardown()
    except Exception:
        pass
    if backend != "sqlite":
        import sqlalchemy as sa

        eng = sa.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as c:
            for view in ("item_semantic_id", "item_embedding", "user_recent_items"):
                c.execute(sa.text(f'DROP TABLE IF EXISTS "{project}_{view}"'))
        eng.dispose()


def codebook_for(seed: int, n: int = 600, dim: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    cb = build_codebook(x, levels=3, codes=8, iters=5, seed=seed, data_hash=f"test-{seed}-{uuid.uuid4().hex[:6]}")
    ids = [f"item-{seed}-{i}" for i in range(n)]
    return cb, ids, x


def expected_sids(cb, ids, x):
    codes = cb.assign(x)
    tie = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    return np.c_[codes, dedup_level(codes, tie_order=tie)]


SID_COLS = ["sid_0", "sid_1", "sid_2", "sid_dedup"]


def test_publish_then_online_read_matches_the_codebook(env):
    store = env["store"]
    cb, ids, x = codebook_for(1)
    text = np.random.default_rng(1).normal(size=(len(ids), 24)).astype(np.float32)
    res = store.publish(cb, ids, x, content=text)
    assert res.published and res.items == len(ids) and store.current_version() == cb.version
    # the text-tower vectors the ranker reads come back beside the SIDs and aligned vectors
    _, found, _, raw = store.read_online(ids[:5], cb.version, cb.levels, with_content=True)
    assert found.all()
    np.testing.assert_allclose(np.stack(raw), text[:5], rtol=1e-6)
    got = store.semantic_ids(ids[:50] + ids[-50:], with_embedding=True)
    want = expected_sids(cb, ids, x)
    sel = list(range(50)) + list(range(len(ids) - 50, len(ids)))
    assert got["item_id"].tolist() == [ids[i] for i in sel]
    np.testing.assert_array_equal(got[SID_COLS].to_numpy(), want[sel])
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), x[sel], rtol=1e-6)
    # every published item has a unique full SID
    allsid = store.semantic_ids(ids)[SID_COLS].to_numpy()
    assert len(np.unique(allsid, axis=0)) == len(ids)


def _offline_snapshot(env, version):
    if env["backend"] == "sqlite":
        root = env["settings"].feature_repo_dir / "data" / "offline"
        return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*.parquet"))
    import sqlalchemy as sa

    eng = sa.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://"))
    with eng.connect() as c:
        n = c.execute(sa.text(f'SELECT count(*), max(created) FROM "{env["project"]}_item_semantic_id" '
                              "WHERE codebook_version = :v"), {"v": version}).first()
    eng.dispose()
    return tuple(n)


def test_republishing_a_version_is_a_noop_and_changed_content_is_refused(env):
    from semalign.feature_repo.errors import FeatureStoreError

    store = env["store"]
    cb, ids, x = codebook_for(2)
    store.publish(cb, ids, x)
    before = _offline_snapshot(env, cb.version)
    again = store.publish(cb, ids, x)
    assert not again.published
    assert _offline_snapshot(env, cb.version) == before
    x2 = x.copy()
    x2[0] += 1.0
    with pytest.raises(FeatureStoreError, match="already published with different content"):
        store.publish(cb, ids, x2)


def test_readers_pinned_to_v1_are_unaffected_by_publishing_v2(env):
    store = env["store"]
    cb1, ids, x = codebook_for(3)
    store.publish(cb1, ids, x)
    v1_before = store.semantic_ids(ids, version=cb1.version)
    rng = np.random.default_rng(99)
    x_b = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32)  # same items, moved embeddings
    cb2 = build_codebook(x_b, levels=3, codes=8, iters=5, seed=4, data_hash="v2-" + uuid.uuid4().hex[:6])
    store.publish(cb2, ids, x_b)
    assert store.current_version() == cb2.version
    pd.testing.assert_frame_equal(store.semantic_ids(ids, version=cb1.version), v1_before)
    v2 = store.semantic_ids(ids)  # unpinned: the current version
    assert (v2["codebook_version"] == cb2.version).all()
    np.testing.assert_array_equal(v2[SID_COLS].to_numpy(), expected_sids(cb2, ids, x_b))
    assert (v2[SID_COLS].to_numpy() != v1_before[SID_COLS].to_numpy()).any(axis=1).mean() > 0.2
    names = [v["version"] for v in store.versions()]
    assert cb1.version in names and cb2.version in names


def test_point_in_time_join_respects_publish_and_onboarding_times(env):
    store = env["store"]
    cb1, ids, x = codebook_for(5, n=200)
    t_avail = pd.Timestamp("2020-06-01", tz="UTC")
    avail = [pd.Timestamp("2020-01-01", tz="UTC")] * 199 + [t_avail]   # the last item appears later
    store.publish(cb1, ids, x, available_at=avail)
    cb2 = build_codebook(x[::-1].copy(), levels=3, codes=8, iters=5, seed=6, data_hash="pit-" + uuid.uuid4().hex[:6])
    store.publish(cb2, ids, x)

    late = ids[-1]
    frame = pd.DataFrame({"item_id": [late, late, ids[0]],
                          "event_timestamp": pd.to_datetime(["2020-05-31", "2020-06-02", "2020-05-31"], utc=True)})
    h1 = store.historical(frame, version=cb1.version).sort_values(["item_id", "event_timestamp"]).reset_index(drop=True)
    want1 = expected_sids(cb1, ids, x)
    r = {(row.item_id, str(row.event_timestamp)[:10]): row for row in h1.itertuples()}
    assert pd.isna(r[(late, "2020-05-31")].sid_0)                    # not yet available
    assert int(r[(late, "2020-06-02")].sid_0) == want1[-1, 0]
    assert int(r[(ids[0], "2020-05-31")].sid_dedup) == want1[0, 3]
    # the same frame pinned to v2 sees v2's codes, not v1's
    h2 = store.historical(frame, version=cb2.version)
    row2 = h2[(h2["item_id"] == ids[0])].iloc[0]
    want2 = expected_sids(cb2, ids, x)
    assert [int(row2[c]) for c in SID_COLS] == want2[0].tolist()

    # an item onboarded now is visible from its onboarding time on, in v1 only
    newx = np.random.default_rng(7).standard_normal((1, x.shape[1])).astype(np.float32)
    t_before = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=5)
    out = store.onboard(pd.DataFrame({"item_id": ["fresh-5"]}), version=cb1.version, embeddings=newx)
    t_after = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=5)
    fr = pd.DataFrame({"item_id": ["fresh-5", "fresh-5"], "event_timestamp": [t_before, t_after]})
    h = store.historical(fr, version=cb1.version).sort_values("event_timestamp")
    assert pd.isna(h["sid_0"].iloc[0]) and int(h["sid_0"].iloc[1]) == int(out["sid_0"].iloc[0])
    h = store.historical(fr, version=cb2.version)
    assert h["sid_0"].isna().all()


def test_onboarding_is_servable_at_once_without_collisions_and_idempotent(env):
    store = env["store"]
    cb, ids, x = codebook_for(8, n=300)
    store.publish(cb, ids, x)
    # new items placed on existing items' embeddings: same codes, so they must get fresh dedup slots
    newx = x[:5] + 1e-4
    new_ids = [f"new-8-{i}" for i in range(5)]
    out = store.onboard(pd.DataFrame({"item_id": new_ids}), embeddings=newx)
    assert out["onboarded"].all()
    np.testing.assert_array_equal(out[["sid_0", "sid_1", "sid_2"]].to_numpy(), cb.assign(newx))
    online = store.semantic_ids(new_ids)
    np.testing.assert_array_equal(online[SID_COLS].to_numpy(), out[SID_COLS].to_numpy())
    every = store.semantic_ids(ids + new_ids)[SID_COLS].to_numpy()
    assert len(np.unique(every, axis=0)) == len(ids) + 5
    # onboarding the same items again changes nothing
    again = store.onboard(pd.DataFrame({"item_id": new_ids}), embeddings=newx + 0.3)
    assert not again["onboarded"].any()
    np.testing.assert_array_equal(again[SID_COLS].to_numpy(), out[SID_COLS].to_numpy())


def test_bad_input_gets_clear_errors_and_writes_nothing(env):
    from semalign.feature_repo.errors import ItemsNotFoundError, UnknownVersionError

    store = env["store"]
    cb, ids, x = codebook_for(9, n=100)
    with pytest.raises(ValueError, match="width 16"):
        store.publish(cb, ids, x[:, :8])
    with pytest.raises(ValueError, match="duplicate item ids"):
        store.publish(cb, ids[:-1] + ids[:1], x)
    with pytest.raises(ValueError, match=r"content vectors must have shape \(100, dim\)"):
        store.publish(cb, ids, x, content=np.zeros((99, 4)))
    bad = np.zeros((100, 4))
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="content vector of row 7 is not finite"):
        store.publish(cb, ids, x, content=bad)
    assert cb.version not in [v["version"] for v in store.versions()]
    with pytest.raises(UnknownVersionError, match="unknown"):
        store.semantic_ids(ids[:2], version=cb.version)
    store.publish(cb, ids, x)
    _, _, _, raw = store.read_online(ids[:1], cb.version, cb.levels, with_content=True)
    assert len(raw[0]) == 0  # published without text-tower vectors: an empty one, which a ranker reading it refuses
    with pytest.raises(ItemsNotFoundError, match="nope-1"):
        store.semantic_ids([ids[0], "nope-1"], version=cb.version)
    soft = store.semantic_ids([ids[0], "nope-1"], version=cb.version, strict=False)
    assert soft["found"].tolist() == [True, False] and soft["sid_0"].iloc[1] == -1
    with pytest.raises(ValueError, match="shape"):
        store.onboard(pd.DataFrame({"item_id": ["w"]}), version=cb.version, embeddings=np.zeros((1, 3)))
    with pytest.raises(UnknownVersionError):
        store.onboard(pd.DataFrame({"item_id": ["w"]}), version="no-such-version", embeddings=np.zeros((1, 16)))
    # content needs the item embedder the store was opened with (feature_repo.store.open_store hands it in)
    from semalign.feature_repo.errors import FeatureStoreError

    with pytest.raises(FeatureStoreError, match="without an item embedder"):
        store.onboard(pd.DataFrame({"item_id": ["w"], "text": ["a new item"]}), version=cb.version)
    assert store.semantic_ids(["w"], version=cb.version, strict=False)["found"].tolist() == [False]


def test_a_store_that_is_down_is_a_clear_error_and_nothing_is_published(env, tmp_path):
    from semalign.feature_repo.errors import StoreUnavailableError, UnknownVersionError
    from semalign.feature_repo.store import SemanticIdStore

    if env["backend"] == "sqlite":
        pytest.skip("the embedded store has no server to be down")
    s = env["settings"].model_copy(update={"redis_url": "127.0.0.1:1"})  # same registry and state, dead Redis
    store = SemanticIdStore(s)
    cb, ids, x = codebook_for(10, n=50)
    with pytest.raises(StoreUnavailableError, match="redis online store is unreachable"):
        store.publish(cb, ids, x)
    live = env["store"]
    with pytest.raises(UnknownVersionError, match="still being published"):
        live.semantic_ids(ids[:1], version=cb.version)
    assert live.current_version() != cb.version
    assert live.publish(cb, ids, x).published  # the same publish completes once the store is back


KILL_SCRIPT = """
import json, sys
import numpy as np
from semalign.config import Settings
from semalign.feature_repo.store import SemanticIdStore
from semalign.models.codebook import Codebook
cfg = json.loads(sys.argv[1])
s = Settings(**cfg["settings"])
cb = Codebook.load(cfg["codebook"])
data = np.load(cfg["data"])
SemanticIdStore(s).publish(cb, [str(i) for i in data["ids"]], data["x"])
"""


@pytest.mark.parametrize("point", ["publish.after_offline", "publish.online"])
def test_a_publish_killed_half_way_leaves_readers_on_the_old_version(env, tmp_path, point):
    store = env["store"]
    cb1, ids, x = codebook_for(11, n=200)
    store.publish(cb1, ids, x)
    before = store.semantic_ids(ids)
    x_b = (x + 0.7 * np.random.default_rng(1).standard_normal(x.shape)).astype(np.float32)
    cb2 = build_codebook(x_b, levels=3, codes=8, iters=5, seed=12, data_hash="kill-" + uuid.uuid4().hex[:6])
    folder = cb2.save(tmp_path / "cb2")
    np.savez(tmp_path / "data.npz", ids=np.array(ids), x=x_b)
    s = env["settings"]
    cfg = {"settings": json.loads(s.model_dump_json()), "codebook": str(folder), "data": str(tmp_path / "data.npz")}
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg)],
                            env={**os.environ, "SEMALIGN_PAUSE_AT": point, "SEMALIGN_PAUSE_MARK": str(mark)})
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert mark.exists(), f"the publisher never reached {point} (rc={proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    from semalign.feature_repo.errors import UnknownVersionError
    from semalign.feature_repo.store import SemanticIdStore

    reader = SemanticIdStore(s)  # a fresh reader process's view
    assert reader.current_version() == cb1.version
    pd.testing.assert_frame_equal(reader.semantic_ids(ids), before)
    with pytest.raises(UnknownVersionError, match="still being published"):
        reader.semantic_ids(ids[:1], version=cb2.version)
    # the next publish of the same version completes and is then readable
    assert reader.publish(cb2, ids, x_b).published
    np.testing.assert_array_equal(reader.semantic_ids(ids)[SID_COLS].to_numpy(), expected_sids(cb2, ids, x_b))


PLAIN_CLIENT = """
import json, sys
import feast
cfg = json.loads(sys.argv[1])
store = feast.FeatureStore(repo_path=cfg["repo"])
rows = [{"item_id": i, "codebook_version": cfg["version"]} for i in cfg["items"]]
out = store.get_online_features(features=["item_semantic_id:sid_0", "item_semantic_id:sid_1",
    "item_semantic_id:sid_2", "item_semantic_id:sid_dedup"], entity_rows=rows).to_dict()
svc = store.get_feature_service(cfg["service"])
out2 = store.get_online_features(features=svc, entity_rows=[{**r, "user_id": "nobody"} for r in rows]).to_dict()
rev = store.get_online_features(features=["semantic_id_item:item_id"], entity_rows=[
    {"semantic_id": s, "codebook_version": cfg["version"]} for s in cfg["sids"]]).to_dict()
assert not [m for m in sys.modules if m.split(".")[0] == "semalign"], "the plain client imported semalign"
print(json.dumps({"direct": out, "service": {k: out2[k] for k in ("sid_0", "sid_dedup")},
                  "service_tags": dict(svc.tags), "reverse": rev["item_id"]}))
"""


def test_the_online_reader_answers_like_get_online_features(env):
    """The hot path reads through a private Feast API (feature_repo/online.py); Feast's public read must give
    the same SIDs, vectors and user rows, so a Feast upgrade that changes the private one fails here."""
    store = env["store"]
    cb, ids, x = codebook_for(14, n=60)
    text = np.random.default_rng(14).normal(size=(len(ids), 12)).astype(np.float32)
    store.publish(cb, ids, x, content=text)
    users = pd.DataFrame({"user_id": ["ua", "ub"], "recent_items": [ids[:3], ids[5:6]], "n_events": [7, 1],
                          "positive_rate": [0.25, 1.0], "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC")})
    snapshot = store.publish_users(users, batch=f"contract-{cb.version}")
    asked = ids[:8] + ["not-an-item"]
    codes, found, emb, content = store.read_online(asked, cb.version, cb.levels, with_embedding=True,
                                                   with_content=True)
    public = store.fs.get_online_features(
        features=[f"item_semantic_id:{c}" for c in SID_COLS] + ["item_embedding:embedding", "item_embedding:content"],
        entity_rows=[{"item_id": i, "codebook_version": cb.version} for i in asked]).to_dict()
    assert found.tolist() == [v is not None for v in public["sid_dedup"]] == [True] * 8 + [False]
    np.testing.assert_array_equal(codes[:8], np.array([public[c][:8] for c in SID_COLS]).T)
    for j in range(8):
        np.testing.assert_allclose(emb[j], public["embedding"][j], rtol=1e-6)
        np.testing.assert_allclose(content[j], public["content"][j], rtol=1e-6)
    assert emb[8] is None and content[8] is None
    mine = store.users_online(["ua", "ub", "nobody"], snapshot)
    pub = store.fs.get_online_features(features=[f"user_recent_items:{f}" for f in ("recent_items", "n_events",
                                                                                  "positive_rate")],
                                       entity_rows=[{"user_id": u, "users_version": snapshot}
                                                    for u in ("ua", "ub", "nobody")]).to_dict()
    assert mine[2] is None and pub["n_events"][2] is None
    for k in range(2):
        assert mine[k]["recent_items"] == list(pub["recent_items"][k]) and mine[k]["n_events"] == pub["n_events"][k]
        assert mine[k]["positive_rate"] == pytest.approx(pub["positive_rate"][k])
    # a later snapshot changes nothing a reader pinned to this one sees
    later = store.publish_users(users.assign(n_events=[99, 98]), batch=f"contract-later-{cb.version}")
    assert store.users_online(["ua"], snapshot)[0]["n_events"] == 7
    assert store.users_online(["ua"], later)[0]["n_events"] == 99


def test_the_direct_reader_answers_like_get_online_features(env):
    """`semalign ids get` reads the online store's rows without Feast (feature_repo/direct.py, in the layout
    Feast writes): published items with and without text-tower vectors, onboarded ones and unknown ones come
    back exactly as Feast's public get_online_features (and the Feast-backed reader) give them."""
    from semalign.feature_repo.direct import DirectOnlineReader, semantic_id_records

    store, settings = env["store"], env["settings"]
    cb, ids, x = codebook_for(15, n=40)
    text = np.random.default_rng(15).normal(size=(len(ids), 12)).astype(np.float32)
    store.publish(cb, ids, x, content=text, make_current=False)
    bare, bare_ids, bare_x = codebook_for(16, n=30)
    store.publish(bare, bare_ids, bare_x, make_current=False)       # no text-tower vectors: empty `content`
    new_ids = ["new-15-a", "new-15-b"]
    store.onboard(pd.DataFrame({"item_id": new_ids}), version=cb.version, embeddings=x[:2] + 1e-3)
    reader = DirectOnlineReader(settings)
    for version, asked in ((cb.version, ids[:6] + new_ids + ["not-an-item", "item-16-0"]),
                           (bare.version, bare_ids[:5] + ["item-15-0"])):
        got = reader.read_items(asked, version, 3, with_embedding=True, with_content=True)
        want = store.read_online(asked, version, 3, with_embedding=True, with_content=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        for mine, theirs in zip(got[2] + got[3], want[2] + want[3]):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine.dtype == np.float32 and mine.tobytes() == theirs.tobytes()
        public = store.fs.get_online_features(
            features=[f"item_semantic_id:{c}" for c in SID_COLS] + ["item_embedding:embedding",
                                                                    "item_embedding:content"],
            entity_rows=[{"item_id": i, "codebook_version": version} for i in asked]).to_dict()
        assert got[1].tolist() == [v is not None for v in public["sid_dedup"]]
        for j, f in enumerate(got[1]):
            if f:
                assert got[0][j].tolist() == [public[c][j] for c in SID_COLS]
                assert got[2][j].tolist() == list(public["embedding"][j])
                assert got[3][j].tolist() == list(public["content"][j] or [])
            else:
                assert public["embedding"][j] is None and got[2][j] is None
    assert [len(c) for c in reader.read_items(bare_ids[:2], bare.version, 3, with_content=True)[3]] == [0, 0]
    assert [len(c) for c in reader.read_items(new_ids, cb.version, 3, with_content=True)[3]] == [0, 0]
    # the command's rows are the DataFrame's records, value for value (JSON as the CLI prints them)
    asked = ids[:5] + new_ids
    for emb in (False, True):
        rows = store.semantic_ids(asked, version=cb.version, with_embedding=emb).to_dict("records")
        for r in rows:
            if "embedding" in r:
                r["embedding"] = [float(v) for v in r["embedding"]]
        mine = semantic_id_records(settings, asked, version=cb.version, with_embedding=emb)
        assert json.dumps(mine) == json.dumps(rows)
    from semalign.feature_repo.errors import ItemsNotFoundError, UnknownVersionError

    with pytest.raises(ItemsNotFoundError, match="not-an-item"):
        semantic_id_records(settings, ["not-an-item"], version=cb.version)
    with pytest.raises(UnknownVersionError):
        semantic_id_records(settings, ids[:1], version="no-such-version")


def test_ids_get_reads_without_importing_feast_or_torch(env):
    """The interactive read starts like a tool: `semalign ids get` imports neither Feast nor torch nor pandas."""
    store, settings = env["store"], env["settings"]
    cb, ids, x = codebook_for(17, n=30)
    store.publish(cb, ids, x, make_current=False)
    code = ("import json, sys; from semalign.cli import app; "
            "app(args=['ids', 'get', *sys.argv[2:], '--version', sys.argv[1], '--json'], standalone_mode=False); "
            "print(json.dumps(sorted(m for m in ('feast', 'torch', 'pandas', 'mlflow') if m in sys.modules)))")
    envs = {f"SEMALIGN_{k.upper()}": str(v) for k, v in {**BACKENDS[env["backend"]], "home": settings.home,
                                                          "feast_project": settings.feast_project}.items()}
    proc = subprocess.run([sys.executable, "-c", code, cb.version, *ids[:3]], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **envs})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()
    assert json.loads(out[-1]) == []
    printed = json.loads("\n".join(out[:-1]))["items"]
    want = store.semantic_ids(ids[:3], version=cb.version)
    assert [[r[c] for c in SID_COLS] for r in printed] == want[SID_COLS].to_numpy().tolist()


def test_a_plain_feast_client_reads_the_semantic_ids(env):
    store = env["store"]
    cb, ids, x = codebook_for(13, n=100)
    store.publish(cb, ids, x)
    svc = store.register_ranker_service(f"ranker_test_{cb.version[-6:]}", cb.version, tags={"ranker_version": "7"})
    assert store.service_version(svc) == cb.version
    want = expected_sids(cb, ids, x)[:5]
    sids = ["-".join(map(str, r)) for r in want.tolist()] + ["9999-0-0-0"]
    cfg = {"repo": str(env["settings"].feature_repo_dir), "version": cb.version, "items": ids[:5], "service": svc,
           "sids": sids}
    proc = subprocess.run([sys.executable, "-c", PLAIN_CLIENT, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300, cwd=env["home"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["direct"]["sid_0"] == want[:, 0].tolist() and res["direct"]["sid_dedup"] == want[:, 3].tolist()
    assert res["service"]["sid_0"] == want[:, 0].tolist()
    assert res["service_tags"]["codebook_version"] == cb.version
    assert res["reverse"] == ids[:5] + [None]  # the reverse view: full SID -> item, as plain Feast reads it


def test_the_repo_folder_is_accepted_by_feast_apply_as_is(tmp_path):
    import shutil

    repo = tmp_path / "feature_repo"
    src = Path(__file__).resolve().parents[2] / "feature_repo"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    feast_bin = Path(sys.executable).with_name("feast")
    proc = subprocess.run([str(feast_bin), "apply"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    for name in ("item_semantic_id", "item_embedding", "user_recent_items", "semantic_ids"):
        assert name in out
    assert (repo / "data" / "registry.db").exists()


def test_the_rendered_repo_refers_to_the_postgres_password_instead_of_holding_it(tmp_path, monkeypatch):
    from semalign.feature_repo.repo_config import render_repo

    monkeypatch.delenv("SEMALIGN_FEAST_PG_PASSWORD", raising=False)
    s = Settings(home=tmp_path, feast_offline="postgres", feast_registry="sql",
                 postgres_url="postgresql://bob:s3cr%40t@db.internal:5432/feast")
    text = (render_repo(s, 3) / "feature_store.yaml").read_text()
    assert "s3cr" not in text
    expanded = os.path.expandvars(text)   # what Feast does when it loads the file
    assert "bob:s3cr%40t@db.internal:5432/feast" in expanded and 'password: "s3cr@t"' in expanded


def test_the_rendered_repo_refers_to_the_redis_password_instead_of_holding_it(tmp_path, monkeypatch):
    from semalign.feature_repo.repo_config import render_repo

    monkeypatch.delenv("SEMALIGN_FEAST_REDIS_PASSWORD", raising=False)
    s = Settings(home=tmp_path, feast_online="redis", redis_url="cache.internal:6379,password=r3d!s,db=2")
    text = (render_repo(s, 3) / "feature_store.yaml").read_text()
    assert "r3d!s" not in text and "${SEMALIGN_FEAST_REDIS_PASSWORD}" in text
    expanded = os.path.expandvars(text)   # what Feast does when it loads the file
    assert "cache.internal:6379,password=r3d!s,db=2,socket_timeout=1.0" in expanded


ONBOARD_RACES = """
import json, sys, time
from pathlib import Path
import numpy as np, pandas as pd
from semalign.config import Settings
from semalign.feature_repo.store import SemanticIdStore
store = SemanticIdStore(Settings())
store.fs
folder, version = Path(sys.argv[1]), sys.argv[2]
for rnd, (item, emb) in enumerate(json.loads(sys.argv[3])):
    (folder / f"ready-{sys.argv[4]}-{rnd}").touch()
    while not (folder / f"go-{rnd}").exists():   # start line: both processes onboard at once
        time.sleep(0.01)
    out = store.onboard(pd.DataFrame({"item_id": [item]}), version=version, embeddings=np.load(folder / emb))
    print("race", rnd, json.dumps(out[["sid_0", "sid_1", "sid_2", "sid_dedup"]].to_numpy().tolist()[0]), flush=True)
"""


def test_concurrent_onboarding_gives_one_answer_and_never_shares_a_slot(env, tmp_path):
    """Two processes onboard at the same moment: the same item gets one SID (no 500, one row), and different
    items whose codes collide get different dedup slots."""
    store, s = env["store"], env["settings"]
    cb, ids, x = codebook_for(12, n=200)
    store.publish(cb, ids, x)
    np.save(tmp_path / "same.npy", x[:1] + 1e-4)
    np.save(tmp_path / "twin.npy", x[:1] + 2e-4)   # same codes as the first item: a dedup slot of its own
    child_env = {**os.environ, "SEMALIGN_HOME": str(s.home), "SEMALIGN_FEAST_PROJECT": s.feast_project,
                 **{f"SEMALIGN_{k.upper()}": v for k, v in BACKENDS[env["backend"]].items()}}
    # two processes, two races (one process each start costs Feast's and torch's imports): the same item, then
    # two different items with the same codes; each race starts once both processes stand at its start line
    races = [("race-1", "race-1", "same.npy"), ("race-2", "race-3", "twin.npy")]
    plans = [[(a, "same.npy") for a, _, _ in races], [(b, emb) for _, b, emb in races]]
    procs = [subprocess.Popen([sys.executable, "-c", ONBOARD_RACES, str(tmp_path), cb.version, json.dumps(plan),
                               str(k)], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, plan in enumerate(plans)]
    for rnd in range(len(races)):
        deadline = time.time() + 180
        while not all((tmp_path / f"ready-{k}-{rnd}").exists() for k in range(2)) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.05)
        (tmp_path / f"go-{rnd}").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        got = {int(line.split(" ", 2)[1]): json.loads(line.split(" ", 2)[2]) for line in out.splitlines()
               if line.startswith("race ")}
        outs.append([got[rnd] for rnd in range(len(races))])
    assert outs[0][0] == outs[1][0]                                             # race 1: one answer
    assert outs[0][1][:3] == outs[1][1][:3] and outs[0][1][3] != outs[1][1][3]  # race 2: own dedup slots
    got = store.semantic_ids(["race-1", "race-2", "race-3"], version=cb.version)
    assert len(np.unique(got[SID_COLS].to_numpy(), axis=0)) == 3


def test_a_writer_that_dies_before_confirming_keeps_its_slot(env):
    """Reserve, write, confirm: a slot reserved by a writer that died is handed to nobody else, and onboarding
    the item again writes and confirms it with the same SID."""
    store = env["store"]
    cb, ids, x = codebook_for(13, n=200)
    store.publish(cb, ids, x)
    emb = x[:1] + 1e-4
    codes, dedup, write, fresh = store.catalogue.reserve(cb.version, ["dies-1"], cb.assign(emb))  # then "dies"
    assert write.all() and fresh.all()
    assert not store.semantic_ids(["dies-1"], version=cb.version, strict=False)["found"].iloc[0]
    other = store.onboard(pd.DataFrame({"item_id": ["same-codes"]}), version=cb.version, embeddings=emb + 1e-5)
    assert other["sid_dedup"].iloc[0] != dedup[0]           # the pending slot is not handed out again
    again = store.onboard(pd.DataFrame({"item_id": ["dies-1"]}), version=cb.version, embeddings=emb)
    assert again["onboarded"].iloc[0] and again["sid_dedup"].iloc[0] == dedup[0]
    assert store.semantic_ids(["dies-1"], version=cb.version)["sid_dedup"].iloc[0] == dedup[0]
    third = store.onboard(pd.DataFrame({"item_id": ["dies-1"]}), version=cb.version, embeddings=emb)
    assert not third["onboarded"].iloc[0]                    # confirmed now: nothing written a second time


def test_reverse_lookup_and_diff_of_a_rebuilt_codebook(env):
    """`ids items` finds every item under a SID prefix (onboarded ones too); `ids diff` translates the SIDs of a
    rebuilt codebook, and each publish of a child version writes that translation beside its codebook."""
    from semalign.artifacts import codebook_folder

    store = env["store"]
    cb1, ids, x = codebook_for(11, n=400)
    store.publish(cb1, ids, x)
    new_ids = ["new-11-a", "new-11-b"]
    store.onboard(pd.DataFrame({"item_id": new_ids}), embeddings=x[:2] + 1e-4)
    v1 = store.semantic_ids(ids + new_ids, version=cb1.version)
    first = v1.iloc[-1]                                  # an onboarded item shares its codes with ids[1]
    under = store.items_by_sid(str(first["sid_0"]), version=cb1.version)
    assert set(under["item_id"]) == set(v1.loc[v1["sid_0"] == first["sid_0"], "item_id"])
    assert "onboard" in set(under["source"]) and (under["sid"].str.split("-").str[0] == str(first["sid_0"])).all()
    full = "-".join(str(int(first[c])) for c in SID_COLS)
    got = store.items_by_sid(full, version=cb1.version)  # answered by the reverse feature view
    assert got["item_id"].tolist() == [first["item_id"]] and got["source"].tolist() == ["onboard"]
    assert store.items_by_full_sid([full, "9999-0-0-0"], version=cb1.version)["sid"].tolist() == [full]
    assert len(store.items_by_sid(str(first["sid_0"]), version=cb1.version, limit=3)) == 3
    for bad in ("x", "1--2", "1-2-3-4-5", "-1"):
        with pytest.raises(ValueError, match="not a SID prefix"):
            store.items_by_sid(bad, version=cb1.version)

    moved = x + 0.4 * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    from scipy.optimize import linear_sum_assignment

    cb2 = build_codebook(moved, levels=3, codes=8, iters=5, seed=12, parent=cb1, solve_assignment=linear_sum_assignment,
                         data_hash="child-" + uuid.uuid4().hex[:6])
    assert cb2.parent == cb1.version
    store.publish(cb2, ids, moved)
    summary, table = store.diff(cb1.version, cb2.version)
    v2 = store.semantic_ids(ids, version=cb2.version)
    old, new = v1.iloc[: len(ids)][SID_COLS].to_numpy(), v2[SID_COLS].to_numpy()
    assert summary["shared_items"] == len(ids) and summary["only_in_old"] == 2 and summary["only_in_new"] == 0
    assert summary["churn"] == pytest.approx((old != new).any(1).mean())
    assert summary["prefix_churn_per_level"][0] == pytest.approx((old[:, 0] != new[:, 0]).mean())
    assert 0 < summary["prefix_churn_per_level"][0] <= summary["prefix_churn_per_level"][-1] == summary["churn"]
    row = table.set_index("item_id").loc[ids[7]]
    assert row["old_sid"] == "-".join(map(str, old[7])) and row["new_sid"] == "-".join(map(str, new[7]))
    written = codebook_folder(env["settings"], cb2.version).path
    assert json.loads((written / f"diff-{cb1.version}.json").read_text()) == summary
    pd.testing.assert_frame_equal(pd.read_parquet(written / f"diff-{cb1.version}.parquet"), table)


def test_feast_cli_materializes_and_serves_the_rendered_repo(tmp_path):
    """The rendered repo is a plain Feast repo: after its online store is lost, `feast materialize-incremental`
    rebuilds it from the offline store (items stamped 1970, where the data gave no availability time, included),
    and `feast serve` answers the SID views over HTTP."""
    import socket
    import urllib.request

    from semalign.feature_repo.store import SemanticIdStore

    settings = make_settings(tmp_path / "home", "sqlite", f"t{uuid.uuid4().hex[:10]}")
    store = SemanticIdStore(settings)
    cb, ids, x = codebook_for(21, n=80)
    store.publish(cb, ids, x)                                   # no available_at: stamped 1970
    store.publish_users(pd.DataFrame({"user_id": ["ua"], "recent_items": [ids[:2]], "n_events": [3],
                                      "positive_rate": [0.5], "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC")}),
                        batch="cli")
    repo = settings.feature_repo_dir
    feast_bin = str(Path(sys.executable).with_name("feast"))
    (repo / "data" / "online_store.db").unlink()                # the online store is gone
    for cmd in ([feast_bin, "apply"], [feast_bin, "materialize-incremental", pd.Timestamp.now(tz="UTC").isoformat()]):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    want = expected_sids(cb, ids, x)
    cfg = {"repo": str(repo), "version": cb.version, "items": ids[:5], "service": "semantic_ids",
           "sids": ["-".join(map(str, r)) for r in want[:5].tolist()]}
    proc = subprocess.run([sys.executable, "-c", PLAIN_CLIENT, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["direct"]["sid_0"] == want[:5, 0].tolist() and res["reverse"] == ids[:5]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([feast_bin, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = json.dumps({"features": [f"item_semantic_id:{c}" for c in SID_COLS],
                           "entities": {"item_id": ids[:4], "codebook_version": [cb.version] * 4}}).encode()
        deadline, got = time.time() + 120, None
        while time.time() < deadline and got is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", data=body,
                                             headers={"Content-Type": "application/json"})
                got = json.loads(urllib.request.urlopen(req, timeout=10).read())
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        assert got is not None, "feast serve did not answer within 120 s"
        names = got["metadata"]["feature_names"]
        values = {n: r["values"] for n, r in zip(names, got["results"])}
        assert values["sid_0"] == want[:4, 0].tolist() and values["sid_dedup"] == want[:4, 3].tolist()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
