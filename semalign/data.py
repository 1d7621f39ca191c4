"""Data layer: loaders for the data contract, validation, splits, item buckets, behavior pairs, histories.

Contract (design section 4):
  items:        item_id, text, [image_path], [available_at], [other categorical columns]
  interactions: user_id, item_id, timestamp (UTC; unix seconds or ISO 8601), label (0/1) or rating
Ids are kept as strings so any id scheme works; models see dense integer indices.
"""
from __future__ import annotations

import bisect
import io
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from semalign.errors import DataValidationError, InvalidInputError, NotFoundError  # noqa: F401 (DataValidationError: re-exported)
from semalign.negatives import NEVER, NegativeSampling, sample_negatives

MOVIELENS_100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MOVIELENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
POSITIVE_RATING = 4
BUCKETS = ("unseen", "1-9", "10-99", "100+")   # items by training-window interactions
ALL_BUCKETS = ("all",) + BUCKETS                 # every metric table: all events, then per bucket
MAX_TEXT_CHARS = 100_000     # longer item text is a broken export, not a description
MAX_REQUEST_TEXT_CHARS = 20_000  # per item in a scoring/onboarding request: encoding cost is paid per request
FUTURE_SLACK_S = 86_400      # clock skew tolerated on event timestamps
MAX_ID_CHARS = 256           # item and user ids: printable, at most this long (the store's keys and the API's)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BadRowPolicy = Literal["error", "quarantine"]


@dataclass
class Dataset:
    name: str
    items: pd.DataFrame          # item_id(str), text, image_path(str|None), available_at?, ...; index = item index
    interactions: pd.DataFrame   # user_id(str), item_id(str), ts(int64 s), timestamp(UTC), label(int8), item_idx, user_idx
    report: dict = field(default_factory=dict)  # counts of quarantined rows, missing images, ...
    negatives: dict | None = None  # implicit data: how its negatives were sampled (seed, per positive, weighting)
    partitions: list[str] = field(default_factory=list)  # the interactions' pieces read: lineage

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return int(self.interactions["user_idx"].max()) + 1 if len(self.interactions) else 0

    def content_hash(self) -> str:
        from semalign.hashing import digest

        parts = [pd.util.hash_pandas_object(self.items[["item_id", "text"]], index=False).values,
                 pd.util.hash_pandas_object(self.interactions[["user_id", "item_id", "ts", "label"]],
                                            index=False).values]
        if self.negatives is not None:  # sampled, not given: the sampler's settings are part of what the data is
            parts.append({k: self.negatives[k] for k in ("per_positive", "weighting", "seed")})
        return digest(*parts, length=16)


# ---------------------------------------------------------------- loading

def load_dataset(path: str | Path, on_bad_rows: BadRowPolicy = "error", quarantine_dir: Path | None = None,
                 positive_rating: float = POSITIVE_RATING, negatives: NegativeSampling | None = None,
                 sql_items: str = "items", sql_interactions: str = "interactions",
                 copies: Path | None = None) -> Dataset:
    """A dataset from a local folder (MovieLens-100K's u.data + u.item, or items.* + interactions.*), an
    `s3://bucket/prefix` or a SQL database URL (`sql_items` / `sql_interactions`: table names or queries); the
    interactions as one table or as daily partitions (`interactions/dt=YYYY-MM-DD/`). Interactions without
    `label` or `rating` are positives, and `negatives` says how their negatives are sampled. With `copies` (a
    folder), a remote source's pieces read before are taken from there and only new or changed ones fetched."""
    from semalign.sources import ConsumedPieces, FolderSource, open_source

    source = open_source(path, sql_items, sql_interactions)
    if isinstance(source, FolderSource) and (source.root / "u.data").exists() and (source.root / "u.item").exists():
        items, inter, files = _read_movielens(source.root)
        return validate("movielens-100k", items, inter, files, on_bad_rows, quarantine_dir, positive_rating, negatives)
    if source.kind != "sql" and not source.has_tables():
        raise DataValidationError(source.location, None, None,
                                  "a MovieLens-100K folder (u.data, u.item) or items.csv|parquet + "
                                  "interactions.csv|parquet (or an interactions/ folder of dt=YYYY-MM-DD/ partitions)")
    items, items_name = source.read_items()
    copy = ConsumedPieces(copies, source) if copies is not None and source.kind != "folder" else None
    inter, segments, bad, read, fetched = _read_pieces(source, on_bad_rows, copy)
    if source.root is not None:
        items = _local_images(source.root, items)
    name = Path(source.location).name if source.kind == "folder" else source.location
    files = {"items": items_name, "interactions": segments[0][0] if len(segments) == 1 else source.location,
             "root": source.root, "segments": segments, "bad_pieces": bad, "source": source}
    ds = validate(name, items, inter, files, on_bad_rows, quarantine_dir, positive_rating, negatives)
    if copy is not None:  # only a read that validated is recorded as consumed
        watermark = copy.record(read, fetched)
        ds.report.setdefault("partitions", {}).update(from_source=len(fetched), from_copy=len(read) - len(fetched),
                                                      watermark=watermark["last_partition"])
    return ds


def _read_pieces(source, policy: BadRowPolicy, copy=None):
    """Every interactions piece of `source`, concatenated, with (name, first row, partition, version) per piece. A
    piece that cannot be read as a table with the contract's columns fails the read naming it, or is quarantined
    whole. With `copy` (ConsumedPieces), pieces it holds at their current version are read from it."""
    from semalign.sources import BadPiece

    good, bad = source.pieces()
    local = {p.name: copy.load(p) for p in good if copy is not None and copy.has(p)}
    local = {k: v for k, v in local.items() if not isinstance(v, DataValidationError)}
    remote = [p for p in good if p.name not in local]
    fetched = dict(source.read(remote))
    frames, segments, read, row = [], [], {}, 0
    for piece, got in ((p, local.get(p.name, fetched.get(p))) for p in good):
        if isinstance(got, DataValidationError):
            bad.append(BadPiece(piece, got.column, got.expected))
            continue
        missing = [c for c in ("user_id", "item_id", "timestamp") if c not in got.columns]
        if missing:
            bad.append(BadPiece(piece, missing[0], f"a column '{missing[0]}' (have: {list(got.columns)})"))
            continue
        frames.append(got)
        read[piece] = got
        segments.append((piece.name, row, piece.partition, piece.version))
        row += len(got)
    if bad and policy == "error":
        b = bad[0]
        raise DataValidationError(b.piece.name, None, b.column, b.expected, len(bad))
    if not frames:
        raise DataValidationError(source.location, None, None,
                                  "at least one readable interactions table" + (f" ({len(bad)} bad)" if bad else ""))
    kinds = [("label" in f.columns, "rating" in f.columns) for f in frames]
    odd = next((k for k in range(len(kinds)) if kinds[k] != kinds[0]), None)
    if odd is not None:  # labelled and implicit pieces mixed: no one meaning for the rows without labels
        raise DataValidationError(segments[odd][0], None, "label", "the label columns of the first interactions "
                                  f"file {segments[0][0]} (label, rating or neither) in every file")
    inter = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return inter, segments, bad, read, {p.name for p in remote}


def _local_images(folder: Path, items: pd.DataFrame) -> pd.DataFrame:
    if "image_path" not in items.columns and (folder / "images").is_dir():
        by_stem = {p.stem: p for p in (folder / "images").iterdir() if p.is_file()}
        items["image_path"] = [str(by_stem[str(i)]) if str(i) in by_stem else None for i in items.get("item_id", [])]
    elif "image_path" in items.columns:
        items["image_path"] = [None if _isnull(v) else str(folder / str(v)) for v in items["image_path"]]
    return items


def load_for_settings(settings, data: str | Path | None = None, on_bad_rows: BadRowPolicy | None = None) -> Dataset:
    """The dataset `settings` describe: its location (or `data`), bad-row policy, quarantine folder, SQL tables and
    negative sampling."""
    return load_dataset(data if data else settings.resolved_data(), on_bad_rows=on_bad_rows or settings.on_bad_rows,
                        quarantine_dir=settings.home / "quarantine",
                        negatives=NegativeSampling(settings.negatives_per_positive, settings.negative_sampling,
                                                   settings.negative_seed),
                        sql_items=settings.sql_items, sql_interactions=settings.sql_interactions,
                        copies=settings.home / "sources")


def download_movielens(dest: str | Path) -> Path:
    """Fetch the official MovieLens-100K zip from its publisher (for users with internet; tests never call it)."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(MOVIELENS_100K_URL, timeout=60) as resp:
        payload = resp.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        for member in zf.namelist():
            if member.endswith("/"):
                continue
            (dest / Path(member).name).write_bytes(zf.read(member))
    return dest


def _read_movielens(folder: Path):
    cols = ["item_id", "title", "release", "video", "url"] + MOVIELENS_GENRES
    raw = pd.read_csv(folder / "u.item", sep="|", header=None, names=cols, encoding="latin-1", dtype=str,
                      keep_default_na=False)
    genre_flags = raw[MOVIELENS_GENRES].astype(int).to_numpy()
    genres = ["|".join(g for g, f in zip(MOVIELENS_GENRES, row) if f and g != "unknown") for row in genre_flags]
    desc = None
    if (folder / "descriptions.csv").exists():
        desc = pd.read_csv(folder / "descriptions.csv", dtype=str, keep_default_na=False).set_index("movie_id")
    texts = []
    for iid, title, g in zip(raw["item_id"], raw["title"], genres):
        parts = [title.strip() + "."]
        if g:
            parts.append("Genres: " + ", ".join(g.split("|")) + ".")
        if desc is not None and iid in desc.index:
            d = desc.loc[iid]
            if d["description"]:
                parts.append(d["description"].strip())
            if d["director"]:
                parts.append("Directed by " + ", ".join(d["director"].split("|")[:2]) + ".")
            if d["cast"]:
                parts.append("Starring " + ", ".join(d["cast"].split("|")[:4]) + ".")
        texts.append(" ".join(parts))
    posters = folder / "posters"
    image_path = [str(posters / f"{i}.jpg") if (posters / f"{i}.jpg").exists() else None for i in raw["item_id"]]
    items = pd.DataFrame({"item_id": raw["item_id"], "text": texts, "image_path": image_path, "genres": genres,
                          "available_at": raw["release"].replace("", None)})
    inter = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                        dtype=str)
    return items, inter, {"items": folder / "u.item", "interactions": folder / "u.data", "root": folder,
                          "row_offset": 1}


# ---------------------------------------------------------------- validation

def image_inside(root: Path, path: str) -> str | None:
    """`path` (relative to `root`, or absolute) resolved, symlinks followed, when it stays inside `root`."""
    p = (root / path).resolve()
    return str(p) if p.is_relative_to(root) else None


def bad_ids(ids: pd.Series) -> np.ndarray:
    """Ids the contract refuses: longer than MAX_ID_CHARS, or holding control characters (NUL included)."""
    codes, uniq = pd.factorize(ids)   # each distinct id checked once: events repeat their users' and items' ids
    txt = pd.Series(uniq, dtype=object).astype(str)
    bad = ((txt.str.len() > MAX_ID_CHARS) | txt.str.contains(_CONTROL.pattern, regex=True)).to_numpy(bool)
    return np.append(bad, False)[codes]


def clean_ids(values: pd.Series) -> pd.Series:
    """Ids as text, stripped; None where missing or blank. Each distinct value is handled once (a per-value Python
    call costs seconds per million events)."""
    codes, uniq = pd.factorize(values)
    txt = pd.Series(uniq, dtype=object).astype(str).str.strip()
    clean = np.append(txt.where(txt != "", None).to_numpy(object), None)
    return pd.Series(clean[codes], index=values.index, dtype=object)


ID_EXPECTED = f"an id of at most {MAX_ID_CHARS} characters without control characters"


def _isnull(v) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() == "")


class _Checker:
    """Collects bad rows per file; raises on the first problem (error) or quarantines them (quarantine)."""

    def __init__(self, policy: BadRowPolicy, files: dict, quarantine_dir: Path | None):
        self.policy, self.files, self.qdir = policy, files, quarantine_dir
        self.report: dict[str, int] = {}
        self.quarantined: dict[str, list[pd.DataFrame]] = {}

    def bad(self, which: str, df: pd.DataFrame, mask: np.ndarray, column: str, expected: str,
            fatal: bool = False) -> pd.DataFrame:
        mask = np.asarray(mask, dtype=bool)
        n = int(mask.sum())
        if n == 0:
            return df
        first = int(np.flatnonzero(mask)[0])
        if self.policy == "error" or fatal:
            file, row = self.locate(which, int(df.index[first]))
            raise DataValidationError(file, row, column, expected, n)
        q = df[mask].copy()
        where = [self.locate(which, int(i)) for i in q.index]
        q.insert(0, "_row", [r for _, r in where])
        if which == "interactions" and len(self.files.get("segments") or ()) > 1:
            q.insert(0, "_file", [f for f, _ in where])
        q.insert(1 + ("_file" in q.columns), "_reason", f"{column}: expected {expected}")
        self.quarantined.setdefault(which, []).append(q)
        self.report[f"quarantined_{which}_{column}"] = self.report.get(f"quarantined_{which}_{column}", 0) + n
        return df[~mask]

    def locate(self, which: str, index: int) -> tuple[str, int]:
        """(file, 1-based data row) of a row of the concatenated table: the piece it came from."""
        segs = self.files.get("segments") if which == "interactions" else None
        if not segs:
            return self.files[which], index + 1
        k = bisect.bisect_right([s[1] for s in segs], index) - 1
        return segs[k][0], index - segs[k][1] + 1

    def flush(self):
        bad = self.files.get("bad_pieces") or []
        if (not self.quarantined and not bad) or self.qdir is None:
            return
        self.qdir.mkdir(parents=True, exist_ok=True)
        for which, frames in self.quarantined.items():
            pd.concat(frames).to_csv(self.qdir / f"{which}.csv", index=False)
        if bad:  # whole pieces set aside: which, and why
            pd.DataFrame({"piece": [b.piece.name for b in bad], "partition": [b.piece.partition for b in bad],
                          "_reason": [f"{b.column or 'file'}: expected {b.expected}" for b in bad]}
                         ).to_csv(self.qdir / "interaction_pieces.csv", index=False)


def _parse_timestamps(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s):
        # a typed column (parquet timestamp, any unit): to_numeric would read its ms/us counts as seconds
        t = pd.to_datetime(s, utc=True)
        beyond_ns = t > pd.Timestamp.max.tz_localize("UTC")  # years past 2262: refused as bad timestamps
        return t.mask(beyond_ns).dt.as_unit("ns")
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().all() and len(s):
        return pd.to_datetime(num, unit="s", utc=True, errors="coerce")
    out = pd.to_datetime(s, utc=True, errors="coerce", format="mixed")
    only_num = num.notna() & out.isna()
    out[only_num] = pd.to_datetime(num[only_num], unit="s", utc=True)
    return out


def validate(name: str, items: pd.DataFrame, inter: pd.DataFrame, files: dict, policy: BadRowPolicy = "error",
             quarantine_dir: Path | None = None, positive_rating: float = POSITIVE_RATING,
             negatives: NegativeSampling | None = None) -> Dataset:
    """Checks both tables against the data contract (bad rows fail naming file, row and column, or are
    quarantined) and returns the dataset with dense user/item indices, events in a deterministic order.
    Interactions without `label` or `rating` are positives; their negatives are sampled as `negatives` says."""
    chk = _Checker(policy, files, quarantine_dir)
    implicit = "label" not in inter.columns and "rating" not in inter.columns
    items = items.reset_index(drop=True)
    inter = inter.reset_index(drop=True)
    _require_columns(items, inter, files)
    items = _valid_items(chk, items)
    inter = _valid_interactions(chk, inter, set(items["item_id"]), positive_rating)
    if len(inter) == 0:
        raise DataValidationError(files["interactions"], None, None, "at least one valid interaction")
    chk.flush()
    items = items.reset_index(drop=True)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"])
    users = np.sort(inter["user_id"].unique())
    user_index = pd.Series(np.arange(len(users)), index=users)
    out = pd.DataFrame({
        "user_id": inter["user_id"].to_numpy(),
        "item_id": inter["item_id"].to_numpy(),
        "timestamp": inter["_ts"].array,  # the typed array: to_numpy() would box every timestamp
        "label": inter["_label"].astype("int8").to_numpy(),
    })
    out["ts"] = (out["timestamp"].astype("int64") // 10**9).astype("int64") if out["timestamp"].dtype.kind == "M" \
        else pd.to_datetime(out["timestamp"], utc=True).astype("int64") // 10**9
    out["item_idx"] = item_index.loc[out["item_id"]].to_numpy()
    sampled = None
    if implicit:
        out, sampled = _with_negatives(out, items, negatives or NegativeSampling())
    out["user_idx"] = user_index.loc[out["user_id"]].to_numpy()
    # deterministic order: time, then ids
    out = out.sort_values(["ts", "user_idx", "item_idx"], kind="stable").reset_index(drop=True)
    report = dict(chk.report)
    report.update(items=len(items), interactions=len(out), users=len(users),
                  items_with_image=int(items["image_path"].notna().sum()), positive_rate=float(out["label"].mean()))
    segments, bad = files.get("segments") or [], files.get("bad_pieces") or []
    if files.get("source") is not None:
        report["source"] = f"{files['source'].kind} {files['source'].location}"
    days = sorted({s[2] for s in segments if s[2]})
    if days or bad:
        report["partitions"] = {"read": len(days), "first": days[0] if days else None,
                                "last": days[-1] if days else None, "files": len(segments)}
    if bad:
        report["quarantined_partitions"] = len(bad)
    if sampled is not None:
        report["negatives"] = sampled
    return Dataset(name=name, items=items, interactions=out, report=report, negatives=sampled,
                   partitions=[s[0] for s in segments])


def _with_negatives(pos: pd.DataFrame, items: pd.DataFrame, cfg: NegativeSampling) -> tuple[pd.DataFrame, dict]:
    """The positives of an implicit log and their sampled negatives (label 0, at their positive's timestamp)."""
    available = None
    if "available_at" in items.columns:
        at = pd.to_datetime(items["available_at"], utc=True)
        available = np.where(at.isna().to_numpy(), NEVER, at.astype("int64").to_numpy() // 10**9)
    users, item_idx, ts, stats = sample_negatives(pos["user_id"].to_numpy(object), pos["item_idx"].to_numpy(),
                                                  pos["ts"].to_numpy(), len(items), available, cfg)
    neg = pd.DataFrame({"user_id": users, "item_id": items["item_id"].to_numpy()[item_idx],
                        "timestamp": pd.to_datetime(ts, unit="s", utc=True), "label": np.zeros(len(ts), "int8"),
                        "ts": ts, "item_idx": item_idx})
    out = pd.concat([pos, neg], ignore_index=True)
    out["timestamp"] = pd.to_datetime(out["timestamp"], utc=True)
    return out, stats


def _require_columns(items: pd.DataFrame, inter: pd.DataFrame, files: dict) -> None:
    for col in ("item_id", "text"):
        if col not in items.columns:
            raise DataValidationError(files["items"], None, col, f"a column '{col}' (have: {list(items.columns)})")
    for col in ("user_id", "item_id", "timestamp"):
        if col not in inter.columns:
            raise DataValidationError(files["interactions"], None, col,
                                      f"a column '{col}' (have: {list(inter.columns)})")


def _valid_items(chk: "_Checker", items: pd.DataFrame) -> pd.DataFrame:
    items["item_id"] = clean_ids(items["item_id"])
    items = chk.bad("items", items, items["item_id"].isna().to_numpy(), "item_id", "a non-empty id", fatal=True)
    items = chk.bad("items", items, bad_ids(items["item_id"]), "item_id", ID_EXPECTED)
    dup = items["item_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        iid = items["item_id"].iloc[first]
        orig = int(np.flatnonzero((items["item_id"] == iid).to_numpy())[0])
        chk.bad("items", items, dup, "item_id", f"unique ids (id '{iid}' first seen at row {orig + 1})", fatal=True)
    text = items["text"].map(lambda v: "" if _isnull(v) else str(v))
    items["text"] = text
    items = chk.bad("items", items, (text.str.strip() == "").to_numpy(), "text", "non-empty item text")
    items = chk.bad("items", items, (items["text"].str.len() > MAX_TEXT_CHARS).to_numpy(), "text",
                    f"item text of at most {MAX_TEXT_CHARS:,} characters")
    if "image_path" not in items.columns:
        items["image_path"] = None
    items["image_path"] = items["image_path"].map(lambda v: None if _isnull(v) else str(v))
    if chk.files.get("root") is not None:  # images are the dataset's own: nothing outside its folder is opened
        root = Path(chk.files["root"]).resolve()
        inside = items["image_path"].map(lambda v: None if v is None else image_inside(root, v))
        items = chk.bad("items", items, (items["image_path"].notna() & inside.isna()).to_numpy(), "image_path",
                        f"a path inside the dataset folder {root}")
        items = items.assign(image_path=inside[items.index])
    missing_img = items["image_path"].map(lambda p: p is not None and not Path(p).is_file())
    if missing_img.any():
        chk.report["missing_image_files"] = int(missing_img.sum())
        items.loc[missing_img, "image_path"] = None
    if "available_at" in items.columns:
        given = items["available_at"].map(lambda v: not _isnull(v)).to_numpy(bool)
        at = _parse_timestamps(items["available_at"].where(given, None))
        items = chk.bad("items", items.assign(available_at=at), given & at.isna().to_numpy(), "available_at",
                        "a date (ISO 8601) or unix seconds, or nothing")
    return items


def _valid_interactions(chk: "_Checker", inter: pd.DataFrame, known: set, positive_rating: float) -> pd.DataFrame:
    for col in ("user_id", "item_id"):
        inter[col] = clean_ids(inter[col])
        inter = chk.bad("interactions", inter, inter[col].isna().to_numpy(), col, "a non-empty id")
        inter = chk.bad("interactions", inter, bad_ids(inter[col]), col, ID_EXPECTED)
    ts = _parse_timestamps(inter["timestamp"])
    inter = chk.bad("interactions", inter.assign(_ts=ts), ts.isna().to_numpy(), "timestamp",
                    "a UTC timestamp (unix seconds or ISO 8601)")
    inter = chk.bad("interactions", inter, (inter["_ts"] < pd.Timestamp(0, tz="UTC")).to_numpy(), "timestamp",
                    "a timestamp at or after 1970-01-01T00:00:00Z")
    latest = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=FUTURE_SLACK_S)
    inter = chk.bad("interactions", inter, (inter["_ts"] > latest).to_numpy(), "timestamp",
                    "a timestamp that is not in the future (1 day of clock skew allowed)")
    if "label" in inter.columns:
        lab = pd.to_numeric(inter["label"], errors="coerce")
        inter = chk.bad("interactions", inter.assign(_label=lab), ~lab.isin([0, 1]).to_numpy(), "label", "0 or 1")
    elif "rating" not in inter.columns:  # implicit feedback: every row is a positive
        inter = inter.assign(_label=np.int8(1))
    else:
        rating = pd.to_numeric(inter["rating"], errors="coerce")
        inter = chk.bad("interactions", inter.assign(_label=(rating >= positive_rating).astype("int8")),
                        ~np.isfinite(rating.to_numpy(float)), "rating", "a finite number")
    inter = chk.bad("interactions", inter, ~inter["item_id"].isin(known).to_numpy(), "item_id",
                    "an item_id present in the items file")
    dups = inter.duplicated(["user_id", "item_id", "_ts"], keep="first").to_numpy()
    inter = chk.bad("interactions", inter, dups, "timestamp", "one event per (user_id, item_id, timestamp)")
    return inter


# ---------------------------------------------------------------- splits, buckets, pairs, histories

@dataclass
class Split:
    kind: str
    events: pd.DataFrame         # interactions + 'part' in {train,val,test}
    cold_items: np.ndarray       # item indices held out entirely (cold-items split): their events are test events
    train_counts: np.ndarray     # per item: events in the training window
    val_cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # pseudo-cold items: held out of training the way test items are, their events are validation events

    def part(self, name: str) -> pd.DataFrame:
        return self.events[self.events["part"] == name]

    @property
    def train_items(self) -> np.ndarray:
        return np.flatnonzero(self.train_counts > 0)


def make_split(ds: Dataset, kind: str = "cold-items", seed: int = 0, cold_share: float = 0.2,
               val_cold_share: float = 0.1) -> Split:
    """`cold-items`: `cold_share` of the interacted items are test items (all their events are test events);
    `val_cold_share` of the rest are pseudo-cold validation items (all their events are validation events), so
    early stopping and lever choices see cold items without ever seeing a test item; the remaining events split
    chronologically 80/10/10. `temporal`: one chronological 80/10/10 split."""
    ev = ds.interactions.copy()
    cold = np.array([], dtype=np.int64)
    val_cold = np.array([], dtype=np.int64)
    if kind == "cold-items":
        interacted = np.unique(ev["item_idx"].to_numpy())
        rng = np.random.default_rng(seed)
        n_cold = int(round(cold_share * len(interacted)))
        cold = np.sort(rng.choice(interacted, size=n_cold, replace=False))
        rest = np.setdiff1d(interacted, cold)
        n_val = int(round(val_cold_share * len(rest)))
        val_cold = np.sort(np.random.default_rng([seed, 1]).choice(rest, size=n_val, replace=False))
        is_cold = ev["item_idx"].isin(cold).to_numpy()
    elif kind == "temporal":
        is_cold = np.zeros(len(ev), dtype=bool)
    else:
        raise InvalidInputError(f"unknown split '{kind}': expected 'cold-items' or 'temporal'")
    part = np.full(len(ev), "test", dtype=object)
    warm_pos = np.flatnonzero(~is_cold)  # events are already in (ts, user, item) order
    n = len(warm_pos)
    part[warm_pos[: int(0.8 * n)]] = "train"
    part[warm_pos[int(0.8 * n): int(0.9 * n)]] = "val"
    part[ev["item_idx"].isin(val_cold).to_numpy()] = "val"
    ev["part"] = part
    counts = np.bincount(ev.loc[ev["part"] == "train", "item_idx"], minlength=ds.n_items)
    return Split(kind=kind, events=ev, cold_items=cold, train_counts=counts, val_cold_items=val_cold)


def settings_split(ds: Dataset, settings) -> Split:
    """The split a `Settings` object describes (kind, seed, test and pseudo-cold validation shares)."""
    return make_split(ds, settings.split, settings.seed, settings.cold_item_share, settings.val_cold_item_share)


def event_keys(events: pd.DataFrame) -> np.ndarray:
    """A stable 64-bit key per event (user id, item id, timestamp), the same in any copy of the data: a ranker
    keeps the keys of the events it trained and validated on, so a later window can be judged on the rest."""
    if not len(events):
        return np.zeros(0, np.uint64)
    return pd.util.hash_pandas_object(events[["user_id", "item_id", "ts"]], index=False).to_numpy(np.uint64)


def item_buckets(train_counts: np.ndarray) -> np.ndarray:
    """Bucket name per item by its training-window interaction count."""
    edges = np.digitize(train_counts, [1, 10, 100])
    return np.array(BUCKETS, dtype=object)[edges]


def mine_pairs(events: pd.DataFrame, window: int = 3, max_gap_s: float = 7 * 86400.0,
               positives_only: bool = True) -> np.ndarray:
    """Behavior pairs: items one user engaged with close together in time (within `window` steps and
    `max_gap_s` seconds). Returns unique unordered pairs as an int64 array [n, 2] (a < b), sorted."""
    ev = events[events["label"] == 1] if positives_only else events
    ev = ev.sort_values(["user_idx", "ts", "item_idx"], kind="stable")
    u, t, it = ev["user_idx"].to_numpy(), ev["ts"].to_numpy(), ev["item_idx"].to_numpy()
    out = []
    for k in range(1, window + 1):
        ok = (u[k:] == u[:-k]) & ((t[k:] - t[:-k]) <= max_gap_s) & (it[k:] != it[:-k])
        a, b = it[:-k][ok], it[k:][ok]
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    if not out or sum(len(o) for o in out) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out), axis=0).astype(np.int64)


def user_histories(events: pd.DataFrame, train: pd.DataFrame, max_len: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """For each event, the user's positive training-window items strictly before the event's timestamp
    (most recent last). Returns (item indices + 1, 0 = padding) [n, max_len] and lengths [n]."""
    pos = train[train["label"] == 1].sort_values(["user_idx", "ts", "item_idx"], kind="stable")
    hist = np.zeros((len(events), max_len), dtype=np.int64)
    lens = np.zeros(len(events), dtype=np.int64)
    if not len(events) or not len(pos):
        return hist, lens
    p_user, p_ts = pos["user_idx"].to_numpy(np.int64), pos["ts"].to_numpy(np.int64)
    p_item = pos["item_idx"].to_numpy(np.int64)
    ev_u, ev_t = events["user_idx"].to_numpy(np.int64), events["ts"].to_numpy(np.int64)
    # one sorted (user, ts) key over all positives: an event's history ends where its own key would be inserted
    # (searchsorted, O(n log n) for all users at once instead of a scan of the events per user)
    t0 = min(int(p_ts.min()), int(ev_t.min()))
    span = max(int(p_ts.max()), int(ev_t.max())) - t0 + 1
    if (max(int(p_user.max()), int(ev_u.max())) + 1) * span >= 2 ** 62:
        raise InvalidInputError(f"the dataset's {max(int(p_user.max()), int(ev_u.max())) + 1:,} users over a timestamp "
                                f"range of {span:,} s overflow the 64-bit history key: drop events outside the "
                                "window you train on")
    cut = np.searchsorted(p_user * span + (p_ts - t0), ev_u * span + (ev_t - t0), side="left")  # strictly before
    lens[:] = np.minimum(cut - np.searchsorted(p_user, ev_u, side="left"), max_len)
    col = np.arange(max_len)
    for s in range(0, len(events), 65_536):  # bounded temporaries: [chunk, max_len]
        c, n = cut[s: s + 65_536, None], lens[s: s + 65_536, None]
        src = np.clip(c - max_len + col, 0, len(p_item) - 1)
        hist[s: s + 65_536] = np.where(col >= max_len - n, p_item[src] + 1, 0)
    return hist, lens
