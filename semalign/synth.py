"""A deterministic synthetic catalogue in the data contract (design section 4), for scale tests and benchmarks.

What it models, so that every stage has real work and the labels a learnable signal:
- items: one primary topic (and a secondary one) each; text = a title and a description of a few dozen words
  drawn from the topic's own word distribution (plus background words and one quality word), then the
  category name; Zipf-like popularity (`zipf` exponent over a random rank); `late_share` of the items are
  introduced late in the window (`available_at`), so they have no events before it;
- users: lognormal activity, two or three favourite topics with weights, a personal bias, a join time;
- events: sessions (bursts of events a minute or two apart, separated by gaps of hours to days); a session
  follows one favourite topic or explores the whole catalogue by popularity;
- labels: click probability = sigmoid(user's affinity to the item's topic + the item's quality + the user's
  bias + noise), about half positive.

Everything is numpy, vectorised per chunk, and written with pyarrow's ParquetWriter chunk by chunk, so memory
is bounded by a chunk (about a million events), not by the catalogue. Every random draw comes from a generator
seeded by (seed, stream, chunk), and chunk boundaries depend only on the inputs: the same arguments give
byte-identical files.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semalign.errors import InvalidInputError

ITEM_CHUNK = 100_000       # items per written row group
EVENT_CHUNK = 1_000_000    # events per chunk of users (approximately: whole users per chunk)
DAY = 86_400
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
POSITIVE_WORDS = ("excellent", "durable", "beloved", "premium", "reliable", "gorgeous", "sturdy", "delightful")
NEGATIVE_WORDS = ("flimsy", "mediocre", "disappointing", "cheap", "fragile", "dull", "awkward", "noisy")
CORE_WORDS = 80            # words specific to a topic
FAVOURITES = 3             # favourite topics per user
# stream ids: each purpose draws from its own generator, so changing one part leaves the others' draws alone
_VOCAB, _ITEMS, _TEXT, _USERS, _EVENTS, _IMAGES = range(6)


@dataclass(frozen=True)
class SynthConfig:
    items: int = 10_000
    users: int | None = None        # default: items // 2
    events: int | None = None       # default: 10 x items
    seed: int = 0
    images: int = 0                 # items that get a small PNG under images/ (topic colour + noise)
    topics: int = 32
    vocab: int = 4_000
    zipf: float = 1.05              # item popularity ~ 1 / rank^zipf
    late_share: float = 0.2         # items introduced in the last 40% of the window
    session_len: float = 6.0        # mean events per session
    explore: float = 0.3            # share of sessions that browse by popularity, not by a favourite topic
    days: int = 180
    end_unix: int = 1_719_705_600   # 2024-06-30T00:00:00Z: fixed, so the output does not depend on today

    def resolved(self) -> "SynthConfig":
        users = self.users if self.users is not None else max(1, self.items // 2)
        events = self.events if self.events is not None else 10 * self.items
        if self.items < 1 or users < 1 or events < 1:
            raise InvalidInputError(f"synth needs at least one item, user and event (items={self.items}, "
                                    f"users={users}, events={events})")
        if not 0 <= self.late_share < 1:
            raise InvalidInputError(f"late_share must be in [0, 1), got {self.late_share}")
        if not 0 <= self.images <= self.items:
            raise InvalidInputError(f"--images must be between 0 and the number of items ({self.items}), got {self.images}")
        topics = max(1, min(self.topics, self.items // 5 or 1))  # every topic holds items
        return SynthConfig(**{**asdict(self), "users": users, "events": events, "topics": topics})


def _rng(cfg: SynthConfig, stream: int, chunk: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream, chunk])


# ---------------------------------------------------------------- vocabulary and items

@dataclass
class _Catalogue:
    words: pa.Array          # vocabulary (strings)
    core: np.ndarray         # [topics, CORE_WORDS] word ids specific to each topic
    topic_names: pa.Array    # one word per topic (the category)
    topic: np.ndarray        # [items] primary topic
    topic2: np.ndarray       # [items] secondary topic
    quality: np.ndarray      # [items] float32, enters the click logit and one word of the text
    popularity: np.ndarray   # [items] float64 weights, sum 1
    available_at: np.ndarray  # [items] int64 unix seconds
    start_unix: int


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct pronounceable words of two or three consonant-vowel syllables."""
    syl = [c + v for c in CONSONANTS for v in VOWELS]
    s = len(syl)
    codes = rng.choice(s * s + s ** 3, size=n, replace=False)
    out = []
    for code in codes.tolist():
        digits = [code // (s * s) % s, code // s % s, code % s] if code >= s * s else [code // s, code % s]
        out.append("".join(syl[d] for d in digits))
    return out


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return np.cumsum(w / w.sum())


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _catalogue(cfg: SynthConfig) -> _Catalogue:
    rng = _rng(cfg, _VOCAB)
    names = _pseudo_words(rng, cfg.vocab + cfg.topics)
    words, topic_names = names[: cfg.vocab], names[cfg.vocab:]
    core = np.stack([rng.choice(cfg.vocab, size=min(CORE_WORDS, cfg.vocab), replace=False)
                     for _ in range(cfg.topics)]).astype(np.int32)
    rng = _rng(cfg, _ITEMS)
    n = cfg.items
    topic_cdf = _zipf_cdf(cfg.topics, 0.6)      # some topics are larger than others
    topic = _draw(topic_cdf, rng.random(n)).astype(np.int32)
    topic[rng.permutation(n)[: cfg.topics]] = np.arange(cfg.topics)  # no empty topic
    topic2 = _draw(topic_cdf, rng.random(n)).astype(np.int32)
    quality = (rng.standard_normal(n) * 0.8).astype(np.float32)
    rank = rng.permutation(n) + 1
    popularity = 1.0 / rank.astype(np.float64) ** cfg.zipf
    popularity /= popularity.sum()
    start = cfg.end_unix - cfg.days * DAY
    late = rng.random(n) < cfg.late_share
    available = np.where(late, start + (0.6 + 0.35 * rng.random(n)) * cfg.days * DAY,
                         start - rng.random(n) * 365 * DAY).astype(np.int64)
    return _Catalogue(words=pa.array(words), core=core, topic_names=pa.array(topic_names), topic=topic,
                      topic2=topic2, quality=quality, popularity=popularity, available_at=available, start_unix=start)


def _ids(prefix: str, idx: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(idx), pa.string()), "")


def _join_words(word_ids: np.ndarray, lengths: np.ndarray, words: pa.Array) -> pa.Array:
    """One string per row: the rows' words (flat ids, `lengths` per row) joined by spaces, in C++ (pyarrow)."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(word_ids))), " ")


def _item_batch(cfg: SynthConfig, cat: _Catalogue, lo: int, hi: int, chunk: int) -> pa.RecordBatch:
    rng = _rng(cfg, _TEXT, chunk)
    n = hi - lo
    topic, topic2 = cat.topic[lo:hi], cat.topic2[lo:hi]
    word_cdf = _zipf_cdf(cat.core.shape[1], 0.8)
    title = cat.core[np.repeat(topic, 3), _draw(word_cdf, rng.random(3 * n))]
    # description: 24..48 words, each from the primary topic (60%), the secondary (15%) or the background (25%)
    lengths = rng.integers(24, 49, size=n)
    row = np.repeat(np.arange(n), lengths)
    source = rng.random(len(row))
    own = np.where(source < 0.6, topic[row], topic2[row])
    desc = cat.core[own, _draw(word_cdf, rng.random(len(row)))]
    background = source >= 0.75
    desc[background] = _draw(_zipf_cdf(len(cat.words), 1.0), rng.random(int(background.sum())))
    # the quality word: its sign agrees with the item's quality more often the further from 0 it is
    good = (cat.quality[lo:hi] + rng.standard_normal(n) * 0.5) > 0
    lexicon = pa.array(POSITIVE_WORDS + NEGATIVE_WORDS)
    quality_word = lexicon.take(pa.array(np.where(good, 0, len(POSITIVE_WORDS))
                                         + rng.integers(0, len(POSITIVE_WORDS), n)))
    text = pc.binary_join_element_wise(
        pc.utf8_capitalize(_join_words(title.ravel(), np.full(n, 3), cat.words)),
        pc.binary_join_element_wise(quality_word, _join_words(desc, lengths, cat.words), " "),
        pc.binary_join_element_wise("Category:", cat.topic_names.take(pa.array(topic)), " "),
        ". ")
    text = pc.binary_join_element_wise(text, ".", "")
    return pa.RecordBatch.from_arrays(
        [_ids("i", np.arange(lo, hi)), text, cat.topic_names.take(pa.array(topic)),
         pa.array(cat.available_at[lo:hi], pa.timestamp("s", tz="UTC"))],
        names=["item_id", "text", "category", "available_at"])


# ---------------------------------------------------------------- users and events

class _ItemSampler:
    """Draws items by popularity: from the whole catalogue, from one topic, or from the items available from the
    start (the fallback for an event that predates every item drawn for it)."""

    def __init__(self, cat: _Catalogue):
        self.global_cdf = np.cumsum(cat.popularity)
        self.by_topic = np.argsort(cat.topic, kind="stable")
        t = cat.topic[self.by_topic]
        w = cat.popularity[self.by_topic]
        topic_total = np.bincount(t, weights=w)
        self.topic_start = np.searchsorted(t, np.arange(len(topic_total)))
        self.topic_end = np.searchsorted(t, np.arange(len(topic_total)), side="right")
        within = np.cumsum(w) - np.repeat(np.cumsum(topic_total) - topic_total, np.bincount(t))
        self.topic_cdf = t + within / topic_total[t]  # topic k's segment rises from k to k + 1
        self.early = np.flatnonzero(cat.available_at <= cat.start_unix)
        self.early_cdf = np.cumsum(cat.popularity[self.early]) / cat.popularity[self.early].sum()

    def anywhere(self, u: np.ndarray) -> np.ndarray:
        return _draw(self.global_cdf, u)

    def in_topic(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.topic_cdf, topic + u, side="right")
        return self.by_topic[np.clip(pos, self.topic_start[topic], self.topic_end[topic] - 1)]

    def available_from_start(self, u: np.ndarray) -> np.ndarray:
        return self.early[_draw(self.early_cdf, u)]


def _user_chunks(counts: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous user ranges of about EVENT_CHUNK events (whole users): depends only on the counts."""
    ends = np.searchsorted(np.cumsum(counts), np.arange(EVENT_CHUNK, counts.sum(), EVENT_CHUNK), side="left") + 1
    bounds = np.unique(np.r_[0, np.minimum(ends, len(counts)), len(counts)])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _event_batch(cfg: SynthConfig, cat: _Catalogue, sampler: _ItemSampler, counts: np.ndarray, lo: int, hi: int,
                 chunk: int) -> pa.RecordBatch:
    rng = _rng(cfg, _EVENTS, chunk)
    n_users = hi - lo
    cnt = counts[lo:hi]
    n = int(cnt.sum())
    end = cfg.end_unix
    # users: favourite topics and their weights, a personal bias, a join time in the first half of the window
    fav = _draw(_zipf_cdf(cfg.topics, 0.6), rng.random((n_users, FAVOURITES)))
    fav_w = rng.dirichlet([3.0, 1.5, 0.75], size=n_users)
    bias = rng.standard_normal(n_users) * 0.5
    joined = cat.start_unix + rng.random(n_users) * 0.5 * cfg.days * DAY
    user = np.repeat(np.arange(n_users), cnt)
    first = np.cumsum(cnt) - cnt                       # first event of each user (meaningful where cnt > 0)
    pos = np.arange(n) - first[user]
    # sessions: a new one starts with probability 1 / session_len (and at each user's first event)
    new_session = (pos == 0) | (rng.random(n) < 1.0 / cfg.session_len)
    session = np.cumsum(new_session) - 1
    sessions_of_user = np.bincount(user[new_session], minlength=n_users)
    mean_gap = (end - joined) / (sessions_of_user + 1)
    gap = np.where(new_session, rng.exponential(1.0, n) * mean_gap[user], 1.0 + rng.exponential(90.0, n))
    since_join = np.cumsum(gap)
    since_join -= (since_join - gap)[first[user]]
    last = since_join[np.maximum(first + cnt - 1, 0)]
    squeeze = np.minimum(1.0, (end - joined) / np.maximum(last, 1.0))  # a user's events stay in the window
    ts = np.floor(joined[user] + since_join * squeeze[user]).astype(np.int64)
    # strictly increasing within a user (so (user, item, timestamp) is unique): running max of ts - pos per user
    offset = user.astype(np.int64) << 34
    ts = np.maximum.accumulate(ts - pos + offset) - offset + pos
    # items: a session follows one favourite topic or explores; a few events stray from the session's topic
    s_user = user[new_session]
    pick = (rng.random(len(s_user))[:, None] > np.cumsum(fav_w[s_user], 1)[:, :-1]).sum(1)
    s_topic = fav[s_user, pick]
    explore = (rng.random(len(s_user)) < cfg.explore)[session] | (rng.random(n) < 0.1)
    item = np.where(explore, sampler.anywhere(rng.random(n)), sampler.in_topic(s_topic[session], rng.random(n)))
    for attempt in range(3):  # an item is not shown before it is available: draw again, then fall back
        early = np.flatnonzero(cat.available_at[item] > ts)
        if not len(early):
            break
        u = rng.random(len(early))
        item[early] = (sampler.available_from_start(u) if attempt == 2 else
                       np.where(explore[early], sampler.anywhere(u), sampler.in_topic(s_topic[session[early]], u)))
    # click: affinity of the user to the item's topic, item quality, user bias, noise
    affinity = (fav_w[user] * (fav[user] == cat.topic[item][:, None])).sum(1)
    logit = 4.0 * (affinity - 0.25) + cat.quality[item] + bias[user] + rng.standard_normal(n) * 0.5
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    return pa.RecordBatch.from_arrays(
        [_ids("u", lo + user), _ids("i", item), pa.array(ts, pa.timestamp("s", tz="UTC")), pa.array(label)],
        names=["user_id", "item_id", "timestamp", "label"])


# ---------------------------------------------------------------- images

def _png(rgb: np.ndarray) -> bytes:
    """A minimal RGB PNG (no dependency beyond zlib): rows with filter byte 0, one IDAT chunk."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], 1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _write_images(cfg: SynthConfig, cat: _Catalogue, folder: Path, size: int = 32) -> None:
    rng = _rng(cfg, _IMAGES)
    palette = rng.integers(30, 226, size=(cfg.topics, 2, 3))  # two colours per topic: a diagonal gradient
    which = np.sort(rng.choice(cfg.items, size=cfg.images, replace=False))
    folder.mkdir()
    ramp = (np.add.outer(np.arange(size), np.arange(size)) / (2 * size - 2))[:, :, None]
    for i in which.tolist():
        a, b = palette[cat.topic[i]]
        img = a + (b - a) * ramp + rng.normal(0, 12, size=(size, size, 3))
        (folder / f"i{i}.png").write_bytes(_png(np.clip(img, 0, 255).astype(np.uint8)))


# ---------------------------------------------------------------- the folder

def generate(out: str | Path, cfg: SynthConfig, force: bool = False,
             progress: Callable[[str, int], None] | None = None) -> dict:
    """Writes `items.parquet`, `interactions.parquet` (and `images/` when cfg.images) into `out`: built in a
    temporary sibling folder and renamed into place, so a killed run leaves nothing half written. Refuses an
    existing non-empty `out` unless `force`. Returns counts, the positive rate and the generation rate."""
    from semalign import atomic

    cfg = cfg.resolved()
    out = check_out(out, force)
    progress = progress or (lambda stage, n: None)
    t0 = time.perf_counter()
    cat = _catalogue(cfg)
    counts = _rng(cfg, _USERS).multinomial(cfg.events, _lognormal_weights(cfg))
    positives = 0
    with atomic.building(out) as tmp:
        with pq.ParquetWriter(tmp / "items.parquet", _ITEM_SCHEMA) as w:
            for chunk, lo in enumerate(range(0, cfg.items, ITEM_CHUNK)):
                hi = min(lo + ITEM_CHUNK, cfg.items)
                w.write_batch(_item_batch(cfg, cat, lo, hi, chunk))
                progress("items", hi - lo)
        t_items = time.perf_counter() - t0
        sampler = _ItemSampler(cat)
        with pq.ParquetWriter(tmp / "interactions.parquet", _EVENT_SCHEMA) as w:
            for chunk, (lo, hi) in enumerate(_user_chunks(counts)):
                if not counts[lo:hi].any():  # a tail of users without events
                    continue
                batch = _event_batch(cfg, cat, sampler, counts, lo, hi, chunk)
                positives += int(pc.sum(batch.column("label")).as_py() or 0)
                w.write_batch(batch)
                progress("events", batch.num_rows)
        if cfg.images:
            _write_images(cfg, cat, tmp / "images")
    wall = time.perf_counter() - t0
    late = cat.available_at > cat.start_unix
    return {"out": str(out), "config": asdict(cfg), "items": cfg.items, "users_with_events": int((counts > 0).sum()),
            "events": cfg.events, "positive_rate": positives / cfg.events, "late_items": int(late.sum()),
            "images": cfg.images, "wall_s": round(wall, 3), "items_s": round(t_items, 3),
            "events_per_s": round(cfg.events / max(wall - t_items, 1e-9)),
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def check_out(out: str | Path, force: bool) -> Path:
    """The output folder, refused when it holds anything and `force` is not given."""
    from semalign.errors import ConflictError

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConflictError(f"{out} exists and is not empty (pass --force to replace it)")
    return out


def _lognormal_weights(cfg: SynthConfig) -> np.ndarray:
    w = _rng(cfg, _USERS, 1).lognormal(0.0, 1.0, cfg.users)
    return w / w.sum()


_ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("text", pa.string()), ("category", pa.string()),
                          ("available_at", pa.timestamp("s", tz="UTC"))])
_EVENT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                           ("timestamp", pa.timestamp("s", tz="UTC")), ("label", pa.int8())])

__all__ = ["SynthConfig", "generate", "check_out", "ITEM_CHUNK", "EVENT_CHUNK"]
