"""Where a dataset lives: a local folder, `s3://bucket/prefix` (any S3-compatible endpoint) or a SQL database
(any SQLAlchemy URL, `postgresql://...`); its interactions as one table or as hive-style daily partitions
(`interactions/dt=YYYY-MM-DD/*.parquet|csv`; in SQL, a `dt` column).

A source hands the loader the items table and the interactions' pieces (files, partitions), each named, so a bad
row or a bad partition is reported by the piece it came from. boto3, SQLAlchemy and pyarrow are imported when a
source of their kind is opened."""
from __future__ import annotations

import csv
import datetime as dt
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from semalign.errors import DataValidationError, InvalidInputError, NotFoundError, UnavailableError

PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
FORMATS = ("parquet", "csv")
READ_THREADS = 8   # object reads in flight at once: S3 latency, not CPU, bounds a partitioned read


@dataclass(frozen=True)
class Piece:
    """One readable unit of the interactions: a file, an object or one `dt` of a table."""
    name: str                # what errors, the quarantine and the lineage call it
    partition: str | None    # the day of a daily partition (YYYY-MM-DD), None for a flat file or table
    version: str             # changes when the content does (size + mtime, ETag, row count)
    key: str                 # how the source reads it (path, object key, dt value)
    fmt: str = "parquet"


@dataclass(frozen=True)
class BadPiece:
    piece: Piece
    column: str | None
    expected: str


def is_uri(data) -> bool:
    return isinstance(data, str) and "://" in data and not data.startswith("file://")


def masked(uri: str) -> str:
    """The URI without a password, for messages and lineage."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def read_table(raw: bytes | Path, name: str, fmt: str) -> pd.DataFrame:
    """A csv or parquet table from a file or from bytes; anything unreadable is a DataValidationError naming it.
    CSV is read as text (ids stay as written), with its header and NUL bytes checked."""
    try:
        if fmt == "parquet":
            return pd.read_parquet(raw if isinstance(raw, Path) else io.BytesIO(raw))
        raw = raw.read_bytes() if isinstance(raw, Path) else raw
        names = next(csv.reader([raw.split(b"\n", 1)[0].decode("utf-8")]), [])
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataValidationError(name, 1, dup[0], f"unique column names (repeated: {dup})")
        nul = raw.find(b"\x00")
        if nul >= 0:  # pandas' C parser silently cuts a field at NUL: refuse instead of reading a shortened id
            line_start = raw.rfind(b"\n", 0, nul) + 1
            col = raw[line_start:nul].count(b",")
            raise DataValidationError(name, raw.count(b"\n", 0, nul), names[col] if col < len(names) else None,
                                      "text without NUL bytes")
        return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except DataValidationError:
        raise
    except UnicodeDecodeError as e:
        raise DataValidationError(name, None, None, f"UTF-8 text ({e.reason} at byte {e.start})") from e
    except Exception as e:  # pandas/pyarrow parser errors carry the line
        raise DataValidationError(name, None, None, f"a readable {fmt} table ({e})") from e


def _fmt(name: str) -> str | None:
    return next((f for f in FORMATS if name.endswith("." + f)), None)


def _pieces(entries: list[tuple[str, str, str, str]]) -> tuple[list[Piece], list[BadPiece]]:
    """Entries under `interactions/` as (path relative to it, display name, version, read key): files directly in
    it, or files in `dt=YYYY-MM-DD/` folders. Names starting with `_` or `.` (_SUCCESS, .crc) are skipped."""
    good, bad = [], []
    for rel, name, version, key in sorted(entries):
        parts = rel.split("/")
        if any(p.startswith(("_", ".")) for p in parts):
            continue
        fmt = _fmt(parts[-1])
        day = None
        if len(parts) == 2:
            m = PARTITION.match(parts[0])
            if m:
                try:
                    day = dt.date.fromisoformat(m.group(1)).isoformat()
                except ValueError:
                    m = None
            if not m:
                bad.append(BadPiece(Piece(name, None, version, key), None,
                                    f"a daily partition folder dt=YYYY-MM-DD (found '{parts[0]}')"))
                continue
        elif len(parts) > 2:
            bad.append(BadPiece(Piece(name, None, version, key), None,
                                "a file in interactions/ or in one interactions/dt=YYYY-MM-DD/ folder"))
            continue
        if fmt is None:
            bad.append(BadPiece(Piece(name, day, version, key), None, "a .parquet or .csv file"))
            continue
        good.append(Piece(name, day, version, key, fmt))
    return good, bad


class Source:
    kind = ""
    location = ""
    root: Path | None = None   # the folder item images resolve in (local folders only)

    def read_items(self) -> tuple[pd.DataFrame, str]:
        raise NotImplementedError

    def pieces(self) -> tuple[list[Piece], list[BadPiece]]:
        raise NotImplementedError

    def read(self, pieces: list[Piece]) -> Iterator[tuple[Piece, pd.DataFrame | DataValidationError]]:
        """Each piece's table, or the error that made it unreadable, in the order given."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            yield from zip(pieces, pool.map(self._read_one, pieces))

    def _read_one(self, piece: Piece):
        try:
            return read_table(self._bytes(piece), piece.name, piece.fmt)
        except DataValidationError as e:
            return e

    def _bytes(self, piece: Piece) -> bytes | Path:
        raise NotImplementedError


class FolderSource(Source):
    kind = "folder"

    def __init__(self, folder: Path):
        self.root = folder
        self.location = str(folder)

    def _find(self, stem: str) -> Path | None:
        return next((self.root / f"{stem}.{f}" for f in FORMATS if (self.root / f"{stem}.{f}").exists()), None)

    def has_tables(self) -> bool:
        return self._find("items") is not None and (self._find("interactions") is not None or
                                                    (self.root / "interactions").is_dir())

    def read_items(self):
        p = self._find("items")
        return read_table(p, str(p), p.suffix[1:]), str(p)

    def pieces(self):
        flat = self._find("interactions")
        if flat is not None:
            st = flat.stat()
            return [Piece(str(flat), None, f"{st.st_size}-{st.st_mtime_ns}", str(flat), flat.suffix[1:])], []
        base = self.root / "interactions"
        entries = []
        for p in base.rglob("*"):
            if p.is_file():
                st = p.stat()
                entries.append((p.relative_to(base).as_posix(), str(p), f"{st.st_size}-{st.st_mtime_ns}", str(p)))
        return _pieces(entries)

    def _bytes(self, piece):
        return Path(piece.key)


class S3Source(Source):
    """`s3://bucket/prefix`: boto3's client with the standard AWS configuration (credentials, region, and
    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for any S3-compatible server)."""
    kind = "s3"

    def __init__(self, uri: str):
        import boto3

        parts = urlsplit(uri)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        if not self.bucket:
            raise InvalidInputError(f"{uri}: expected s3://bucket/prefix")
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client("s3")
        self._keys = self._list()

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(**kw)
        except NoCredentialsError as e:
            raise InvalidInputError(f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                    "or AWS_PROFILE)") from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404"):
                raise NotFoundError(f"{what}: not found ({code})") from e
            raise InvalidInputError(f"{what}: refused by the server ({code or e})") from e
        except BotoCoreError as e:
            raise UnavailableError(f"{what}: the S3 endpoint did not answer ({type(e).__name__})") from e

    def _list(self) -> dict[str, tuple[str, int]]:
        keys, token = {}, None
        base = self.prefix + "/" if self.prefix else ""
        while True:
            kw = {"Bucket": self.bucket, "Prefix": base, **({"ContinuationToken": token} if token else {})}
            page = self._call(self.location, self.client.list_objects_v2, **kw)
            for o in page.get("Contents", []):
                keys[o["Key"][len(base):]] = (o["ETag"].strip('"'), o["Size"])
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def _uri(self, rel: str) -> str:
        return f"{self.location}/{rel}"

    def _full(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def has_tables(self) -> bool:
        return any(f"items.{f}" in self._keys for f in FORMATS) and (
            any(f"interactions.{f}" in self._keys for f in FORMATS) or
            any(k.startswith("interactions/") for k in self._keys))

    def read_items(self):
        rel = next((f"items.{f}" for f in FORMATS if f"items.{f}" in self._keys), None)
        if rel is None:
            raise DataValidationError(self.location, None, None, "items.parquet or items.csv under the prefix")
        piece = Piece(self._uri(rel), None, self._keys[rel][0], self._full(rel), _fmt(rel))
        return read_table(self._bytes(piece), piece.name, piece.fmt), piece.name

    def pieces(self):
        flat = next((f"interactions.{f}" for f in FORMATS if f"interactions.{f}" in self._keys), None)
        if flat is not None:
            return [Piece(self._uri(flat), None, self._keys[flat][0], self._full(flat), _fmt(flat))], []
        return _pieces([(k[len("interactions/"):], self._uri(k), f"{etag}-{size}", self._full(k))
                        for k, (etag, size) in self._keys.items() if k.startswith("interactions/")])

    def _bytes(self, piece):
        body = self._call(piece.name, self.client.get_object, Bucket=self.bucket, Key=piece.key)["Body"]
        return body.read()


def sql_driver_url(url: str) -> str:
    """A postgresql:// URL for SQLAlchemy's psycopg 3 driver (the one installed); other URLs as given."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def _is_query(text: str) -> bool:
    return text.lstrip().split(None, 1)[0].lower() in ("select", "with") if text.strip() else False


class SqlSource(Source):
    """A SQL database: the items and interactions tables (or queries) named in settings. Rows of a table have no
    order, so items are read ordered by item_id (the item order fixes item indices and the dataset hash); a query
    keeps its own ORDER BY. An interactions `dt` column makes each of its days a partition."""
    kind = "sql"

    def __init__(self, url: str, items: str, interactions: str):
        import sqlalchemy as sa

        self.location = masked(url)
        self.items_sql, self.inter_sql = items, interactions
        try:
            self.engine = sa.create_engine(sql_driver_url(url))
        except Exception as e:  # an unknown dialect or a malformed URL
            raise InvalidInputError(f"{self.location}: not a database URL SQLAlchemy can open ({e})") from e
        self._inter_cols = list(self._frame(f"SELECT * FROM ({self._select(interactions)}) AS t WHERE 1 = 0",
                                            interactions).columns)

    def _select(self, text: str, order: str | None = None) -> str:
        if _is_query(text):
            return text.strip().rstrip(";")
        quoted = ".".join(self.engine.dialect.identifier_preparer.quote(p) for p in text.split("."))
        return f"SELECT * FROM {quoted}" + (f" ORDER BY {order}" if order else "")

    def _name(self, text: str) -> str:
        return f"{self.location} " + (f"query '{text.strip()[:60]}'" if _is_query(text) else f"table {text}")

    def _frame(self, query: str, what: str, **params) -> pd.DataFrame:
        import sqlalchemy as sa

        try:
            with self.engine.connect() as conn:
                return pd.read_sql_query(sa.text(query), conn, params=params or None)
        except sa.exc.OperationalError as e:
            raise UnavailableError(f"{self.location}: the database did not answer or refused the login "
                                   f"({type(e.orig).__name__ if e.orig else e})") from e
        except sa.exc.DBAPIError as e:
            raise InvalidInputError(f"{self._name(what)}: the database refused it "
                                    f"({str(e.orig).splitlines()[0] if e.orig else e})") from e

    def read_items(self):
        return self._frame(self._select(self.items_sql, order="item_id"), self.items_sql), self._name(self.items_sql)

    def pieces(self):
        name = self._name(self.inter_sql)
        if "dt" not in self._inter_cols:
            return [Piece(name, None, "", "")], []
        counts = self._frame(f"SELECT dt, COUNT(*) AS n FROM ({self._select(self.inter_sql)}) AS t GROUP BY dt",
                             self.inter_sql)
        good, bad = [], []
        for day, n in sorted(zip(counts["dt"], counts["n"]), key=lambda r: str(r[0])):
            piece = Piece(f"{name} dt={day}", None, str(int(n)), "" if day is None else str(day))
            try:
                good.append(Piece(piece.name, dt.date.fromisoformat(str(day)[:10]).isoformat(), piece.version,
                                  piece.key))
            except ValueError:
                bad.append(BadPiece(piece, "dt", f"a day YYYY-MM-DD (found {day!r})"))
        return good, bad

    def read(self, pieces):
        if not pieces:
            return
        base = self._select(self.inter_sql)
        if pieces[0].key == "" and pieces[0].partition is None:   # the whole table
            yield pieces[0], self._frame(base, self.inter_sql)
            return
        frame = self._frame(f"SELECT * FROM ({base}) AS t WHERE CAST(t.dt AS VARCHAR(32)) IN "
                            f"({', '.join(f':d{i}' for i in range(len(pieces)))})", self.inter_sql,
                            **{f"d{i}": p.key for i, p in enumerate(pieces)})
        day = frame.pop("dt").astype(str)
        for p in pieces:
            yield p, frame[(day == p.key).to_numpy()].reset_index(drop=True)


def open_source(data: str | Path, sql_items: str = "items", sql_interactions: str = "interactions") -> Source:
    if is_uri(data):
        scheme = urlsplit(data).scheme.lower()
        if scheme == "s3":
            return S3Source(data)
        return SqlSource(data, sql_items, sql_interactions)
    path = Path(str(data).removeprefix("file://")).expanduser().resolve()
    if not path.is_dir():
        raise NotFoundError(f"dataset folder not found: {path}")
    return FolderSource(path)


class ConsumedPieces:
    """The interactions pieces reads of one remote source consumed, kept under `folder` (SEMALIGN_HOME/sources/<key>):
    the next read fetches only pieces that are new or changed (another version: ETag, row count) from the source and
    takes the others from here; pieces the source no longer lists are dropped. Written only after a read validated,
    so a failed read leaves the record as it was. The past is still read whole, from here: the split is
    chronological over the whole log, and behavior pairs and user histories read the whole training window."""

    def __init__(self, folder: Path, source: Source):
        import json

        from semalign.hashing import digest

        self.folder = Path(folder) / digest(source.kind, source.location, length=16)
        self.location = source.location
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
            self.pieces = manifest["pieces"] if manifest.get("source") == source.location else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.pieces = {}   # none yet, or unreadable: everything is fetched and the record rewritten

    def _file(self, piece: Piece) -> Path:
        from semalign.hashing import digest

        return self.folder / "pieces" / f"{digest(piece.name, piece.version, length=24)}.parquet"

    def has(self, piece: Piece) -> bool:
        rec = self.pieces.get(piece.name)
        return rec is not None and rec.get("version") == piece.version and self._file(piece).exists()

    def load(self, piece: Piece) -> pd.DataFrame | DataValidationError:
        try:
            return pd.read_parquet(self._file(piece))
        except Exception as e:  # a damaged copy: the caller fetches the piece again
            return DataValidationError(self._file(piece), None, None, f"a readable local copy ({e})")

    def record(self, read: dict[Piece, pd.DataFrame], fetched: set[str]) -> dict:
        """Keeps the copies of `read` (every piece of a validated read) and the manifest; returns the watermark."""
        import json
        import os

        from semalign import atomic

        (self.folder / "pieces").mkdir(parents=True, exist_ok=True)
        kept = {}
        for piece, frame in read.items():
            target = self._file(piece)
            if piece.name in fetched or not target.exists():
                tmp = atomic.temp_sibling(target)
                try:
                    frame.to_parquet(tmp, index=False)
                except Exception:  # a column parquet cannot hold (mixed types in a csv-less source): fetch next time
                    tmp.unlink(missing_ok=True)
                    continue
                os.replace(tmp, target)
            kept[piece.name] = {"version": piece.version, "partition": piece.partition, "rows": len(frame)}
        days = sorted(p["partition"] for p in kept.values() if p["partition"])
        watermark = {"partitions": len(kept), "last_partition": days[-1] if days else None}
        atomic.write_text(self.folder / "manifest.json",
                          json.dumps({"source": self.location, "pieces": kept, "watermark": watermark}, indent=1))
        live = {self._file(p).name for p in read}
        for old in (self.folder / "pieces").glob("*.parquet"):
            if old.name not in live:
                old.unlink(missing_ok=True)
        return watermark
