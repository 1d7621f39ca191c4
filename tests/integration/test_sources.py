"""Data where users keep it: one catalogue as a local folder, as daily parquet partitions in S3 (a real moto_server
on loopback) and as Postgres tables (127.0.0.1:5432, a throwaway database) loads to the same dataset, hash included;
bad partitions fail the read naming them, or are quarantined whole with counts."""
import io
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import free_port, wait_for_port
from semalign.data import load_dataset
from semalign.errors import DataValidationError, InvalidInputError, NotFoundError, UnavailableError
from semalign.synth import SynthConfig, generate

PG = "postgresql://postgres@127.0.0.1:5432"
KEYS = {"AWS_ACCESS_KEY_ID": "sources-key", "AWS_SECRET_ACCESS_KEY": "sources-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto_server on loopback; the AWS variables point boto3 at it (AWS_ENDPOINT_URL, as a user would)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **KEYS})
    saved = {k: os.environ.get(k) for k in [*KEYS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        wait_for_port(port)
        import boto3

        yield boto3.client("s3")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "shop"
    generate(folder, SynthConfig(items=300, users=120, events=3000, seed=3))
    items = pd.read_parquet(folder / "items.parquet")
    events = pd.read_parquet(folder / "interactions.parquet")
    return folder, items, events, load_dataset(folder)


@pytest.fixture
def pg_db():
    import sqlalchemy as sa

    name = f"semalign_src_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{PG.replace('postgresql://', 'postgresql+psycopg://')}/postgres",
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(f"{PG.replace('postgresql://', 'postgresql+psycopg://')}/{name}")
    try:
        yield f"{PG}/{name}", engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _days(events: pd.DataFrame) -> pd.Series:
    """A partition per fortnight, named by a day: a few dozen objects keep the test quick (a partition is an arrival
    batch, so its events need not all fall on its day)."""
    t = pd.to_datetime(events["timestamp"], utc=True)
    return (t - pd.to_timedelta(t.dt.day % 14, unit="D")).dt.strftime("%Y-%m-%d")


def _put(client, bucket, key, frame=None, body=None):
    if frame is not None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        body = buf.getvalue()
    client.put_object(Bucket=bucket, Key=key, Body=body)


def _to_s3(client, bucket, items, events):
    client.create_bucket(Bucket=bucket)
    _put(client, bucket, "shop/items.parquet", items)
    for day, part in events.groupby(_days(events)):
        _put(client, bucket, f"shop/interactions/dt={day}/part-0.parquet", part.reset_index(drop=True))
    return f"s3://{bucket}/shop"


def test_folder_s3_partitions_and_postgres_give_the_same_dataset(tmp_path, s3, catalogue, pg_db):
    folder, items, events, ref = catalogue
    # the same catalogue as local daily partitions
    local = tmp_path / "partitioned"
    local.mkdir()
    items.to_parquet(local / "items.parquet", index=False)
    for day, part in events.groupby(_days(events)):
        (local / "interactions" / f"dt={day}").mkdir(parents=True)
        part.to_parquet(local / "interactions" / f"dt={day}" / "part-0.parquet", index=False)
    (local / "interactions" / "_SUCCESS").write_text("")  # what Spark leaves beside partitions: skipped
    # ... as S3 partitions
    uri = _to_s3(s3, "same-catalogue", items, events)
    # ... as Postgres tables: rows of a table have no order, so the items query orders them (by the file's row)
    url, engine = pg_db
    items.assign(pos=range(len(items))).to_sql("items", engine, index=False)
    events.assign(dt=_days(events)).to_sql("events", engine, index=False, chunksize=1000)
    query = "SELECT item_id, text, category, available_at FROM items ORDER BY pos"

    got = {"partitioned folder": load_dataset(local), "s3": load_dataset(uri),
           "postgres": load_dataset(url, sql_items=query, sql_interactions="events")}
    n_days = _days(events).nunique()
    for name, ds in got.items():
        assert ds.content_hash() == ref.content_hash(), name
        pd.testing.assert_frame_equal(ds.interactions, ref.interactions, check_dtype=False, obj=name)
        assert ds.report["partitions"]["read"] == n_days and len(ds.partitions) == n_days, name
    assert got["s3"].report["source"] == f"s3 {uri}" and got["s3"].partitions[0].startswith(uri + "/interactions/dt=")
    # a table name is read as the table; items ordered by item_id
    by_id = load_dataset(url, sql_items="items", sql_interactions="events")
    assert list(by_id.items["item_id"]) == sorted(items["item_id"])
    # the command line hands a URI on as written (a Path would drop a slash of s3://)
    import json

    from typer.testing import CliRunner

    from semalign.cli import app

    out = CliRunner().invoke(app, ["data", "check", "--data", uri, "--home", str(tmp_path / "h"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["data"]["source"] == f"s3 {uri}"


def test_bad_partitions_fail_the_read_by_name_or_are_quarantined_with_counts(tmp_path, s3, catalogue):
    _, items, events, ref = catalogue
    uri = _to_s3(s3, "bad-partitions", items, events)
    _put(s3, "bad-partitions", "shop/interactions/dt=2031-02-30/part-0.parquet", events.head(5))  # no such day
    _put(s3, "bad-partitions", "shop/interactions/dt=2031-03-01/part-0.parquet", body=b"PAR1 not parquet")
    _put(s3, "bad-partitions", "shop/interactions/dt=2031-03-02/part-0.parquet", events.head(5).drop(columns="item_id"))
    with pytest.raises(DataValidationError) as e:
        load_dataset(uri)
    assert e.value.file == f"{uri}/interactions/dt=2031-02-30/part-0.parquet" and e.value.count == 3
    assert "dt=YYYY-MM-DD" in str(e.value)
    q = tmp_path / "q"
    ds = load_dataset(uri, on_bad_rows="quarantine", quarantine_dir=q)
    assert ds.report["quarantined_partitions"] == 3 and ds.content_hash() == ref.content_hash()
    pieces = pd.read_csv(q / "interaction_pieces.csv")
    assert sorted(pieces["piece"].str.extract(r"dt=([^/]+)/")[0]) == ["2031-02-30", "2031-03-01", "2031-03-02"]
    assert pieces["_reason"].str.contains("item_id").sum() == 1
    # a bad row inside a good partition is named by that partition's file and its row there
    day = sorted(_days(events).unique())[4]
    part = events[_days(events) == day].reset_index(drop=True).copy()
    part.loc[2, "item_id"] = "no-such-item"
    _put(s3, "bad-partitions", f"shop/interactions/dt={day}/part-0.parquet", part)
    with pytest.raises(DataValidationError) as e:
        load_dataset(uri, on_bad_rows="error")
    assert e.value.file.endswith("dt=2031-02-30/part-0.parquet")  # bad partitions are named first
    for key in ("dt=2031-02-30", "dt=2031-03-01", "dt=2031-03-02"):
        s3.delete_object(Bucket="bad-partitions", Key=f"shop/interactions/{key}/part-0.parquet")
    with pytest.raises(DataValidationError) as e:
        load_dataset(uri)
    assert (e.value.file, e.value.row, e.value.column) == (f"{uri}/interactions/dt={day}/part-0.parquet", 3, "item_id")
    ds = load_dataset(uri, on_bad_rows="quarantine", quarantine_dir=q)
    bad_rows = pd.read_csv(q / "interactions.csv")
    assert list(bad_rows["_row"]) == [3] and bad_rows["_file"][0].endswith(f"dt={day}/part-0.parquet")


def test_unreachable_or_missing_sources_are_clear_errors(s3, pg_db):
    with pytest.raises(NotFoundError, match="NoSuchBucket"):
        load_dataset("s3://no-such-bucket/shop")
    s3.create_bucket(Bucket="empty-prefix")
    with pytest.raises(DataValidationError, match="items.csv"):
        load_dataset("s3://empty-prefix/nothing-here")
    url, _ = pg_db
    with pytest.raises(InvalidInputError, match="table interactions"):
        load_dataset(url)
    with pytest.raises(UnavailableError) as e:
        load_dataset(f"postgresql://postgres:hunter2-secret@127.0.0.1:{free_port()}/x")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


def test_a_refresh_reads_only_new_or_changed_partitions_and_a_failed_read_records_nothing(tmp_path, s3, catalogue):
    _, items, events, ref = catalogue
    days = _days(events)
    last = sorted(days.unique())[-1]
    uri = _to_s3(s3, "incremental", items, events[days != last])
    copies = tmp_path / "sources"
    first = load_dataset(uri, copies=copies)
    n = first.report["partitions"]["read"]
    assert first.report["partitions"]["from_source"] == n and first.report["partitions"]["from_copy"] == 0
    # a new day arrives: only it is fetched, the rest comes from the copy; the dataset is the full read's
    _put(s3, "incremental", f"shop/interactions/dt={last}/part-0.parquet", events[days == last].reset_index(drop=True))
    second = load_dataset(uri, copies=copies)
    assert (second.report["partitions"]["from_source"], second.report["partitions"]["from_copy"]) == (1, n)
    assert second.report["partitions"]["watermark"] == last
    assert second.content_hash() == ref.content_hash() == load_dataset(uri).content_hash()
    # a partition rewritten upstream (new ETag) is fetched again
    day0 = sorted(days.unique())[0]
    part = events[days == day0].reset_index(drop=True)
    _put(s3, "incremental", f"shop/interactions/dt={day0}/part-0.parquet", part.iloc[1:])
    third = load_dataset(uri, copies=copies)
    assert third.report["partitions"]["from_source"] == 1 and len(third.interactions) == len(ref.interactions) - 1
    # a read that fails validation leaves the record as it was: the next good read fetches the bad day again
    manifest = next(copies.glob("*/manifest.json"))
    before = manifest.read_text()
    broken = part.assign(item_id="no-such-item")
    _put(s3, "incremental", f"shop/interactions/dt={day0}/part-0.parquet", broken)
    with pytest.raises(DataValidationError):
        load_dataset(uri, copies=copies)
    assert manifest.read_text() == before
    _put(s3, "incremental", f"shop/interactions/dt={day0}/part-0.parquet", part)
    again = load_dataset(uri, copies=copies)
    assert again.report["partitions"]["from_source"] == 1 and again.content_hash() == ref.content_hash()
