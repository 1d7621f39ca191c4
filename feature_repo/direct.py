"""Online reads without importing Feast: the rows of Feast's sqlite and Redis online stores, read in the layout
Feast writes them, for the interactive commands (`semalign ids get`), which would otherwise import Feast (and
through it the training stack) to read a few rows.

The layout (Feast 0.67, `entity_key_serialization_version: 3`, no feature-view versioning, as repo_config.py
renders feature_store.yaml):
- an entity key is serialized as `feast.infra.key_encoding_utils.serialize_entity_key` does: the join keys
  sorted, their count (uint32 LE), then per key its type (STRING = 2) and length (uint32 LE each) and UTF-8
  bytes, then per value the same;
- sqlite: one table `<project>_<view>` with a row per (entity_key, feature_name) whose `value` is a serialized
  `feast.types.Value` protobuf;
- Redis: one hash per entity at key `<entity key><project>`, one field per feature named by the murmur3-32 hash
  of `<view>:<feature>` (4 bytes, little endian), holding the serialized Value, plus `_ts:<view>`.

`tests/integration/test_feature_store.py::test_the_direct_reader_answers_like_get_online_features` pins the
answers to Feast's public `get_online_features` on both backends, so a Feast upgrade that changes the layout
fails there."""
from __future__ import annotations

import struct

from semalign.feature_repo.errors import FeatureStoreError, ItemsNotFoundError, reaching

ENTITY_KEY_VERSION = 3       # feature_store.yaml's entity_key_serialization_version (repo_config.py)
_STRING = 2                  # feast.types.ValueType.STRING
# feast.types.Value fields semalign's views hold (Value.proto): int64_val, float_val, string_val, float_list_val,
# string_list_val; null_val marks a value written as null
_INT64, _FLOAT, _STRING_VAL, _FLOAT_LIST, _STRING_LIST, _NULL = 4, 6, 2, 16, 12, 19
SID_VIEW, EMB_VIEW = "item_semantic_id", "item_embedding"   # repo_config.py's names (its import is heavier)


def entity_key(join_keys: dict[str, str]) -> bytes:
    """Feast's serialized entity key (version 3) of string join keys."""
    pairs = sorted(join_keys.items())
    out = [struct.pack("<I", len(pairs))]
    for part in [k for k, _ in pairs] + [v for _, v in pairs]:
        b = part.encode("utf8")
        out += [struct.pack("<II", _STRING, len(b)), b]
    return b"".join(out)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> dict[int, object]:
    """{field number: varint int | 4-byte chunk | length-delimited bytes} of one protobuf message (last one wins,
    as protobuf parsing does for a singular field)."""
    out, i = {}, 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            out[field], i = _varint(buf, i)
        elif wire == 1:
            out[field], i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            out[field], i = buf[i:i + n], i + n
        elif wire == 5:
            out[field], i = buf[i:i + 4], i + 4
        else:
            raise FeatureStoreError(f"the online store holds a value this reader cannot parse (wire type {wire})")
    return out


def _repeated(buf: bytes, wire_fixed: int) -> list:
    """The `val` (field 1) entries of a FloatList (fixed 4 bytes, packed or not) or StringList."""
    vals, i = [], 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, i = _varint(buf, i)
            chunk, i = buf[i:i + n], i + n
            if field == 1 and wire_fixed:  # a packed run of floats
                vals.extend(struct.unpack(f"<{n // 4}f", chunk))
            elif field == 1:
                vals.append(chunk)
        elif wire == 5:
            if field == 1:
                vals.extend(struct.unpack("<f", buf[i:i + 4]))
            i += 4
        elif wire == 0:
            _, i = _varint(buf, i)
        else:
            raise FeatureStoreError(f"the online store holds a list this reader cannot parse (wire type {wire})")
    return vals


def value(buf: bytes | None):
    """The Python value of a serialized feast Value holding one of semalign's kinds; None when unset or null."""
    if not buf:
        return None
    f = _fields(buf)
    if _INT64 in f:
        v = f[_INT64]
        return v - (1 << 64) if v >= 1 << 63 else v
    if _FLOAT_LIST in f:
        return _repeated(f[_FLOAT_LIST], 4)
    if _FLOAT in f:
        return struct.unpack("<f", f[_FLOAT])[0]
    if _STRING_VAL in f:
        return f[_STRING_VAL].decode("utf8")
    if _STRING_LIST in f:
        return [s.decode("utf8") for s in _repeated(f[_STRING_LIST], 0)]
    return None


class DirectOnlineReader:
    """Reads rows of the configured online store (sqlite or Redis) by entity key, as Feast's provider does."""

    def __init__(self, settings):
        self.settings, self.project, self.kind = settings, settings.feast_project, settings.feast_online
        self._redis = None

    def rows(self, view: str, keys: list[bytes], features: list[str]) -> list[dict | None]:
        """Per key, {feature: serialized Value} of the features the store holds for it (None: no row)."""
        with reaching(f"the {self.kind} online store"):
            return self._sqlite(view, keys, features) if self.kind == "sqlite" else self._redis_rows(view, keys, features)

    def _sqlite(self, view, keys, features):
        import sqlite3

        path = self.settings.feature_repo_dir / "data" / "online_store.db"
        if not path.exists():
            return [None] * len(keys)
        table = f'"{self.project}_{view}"'
        got: dict[bytes, dict] = {}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            for s in range(0, len(keys), 900):  # under sqlite's bound on variables per statement
                part = keys[s:s + 900]
                try:
                    cur = conn.execute(f"SELECT entity_key, feature_name, value FROM {table} "
                                       f"WHERE entity_key IN ({','.join('?' * len(part))})", part)
                except sqlite3.OperationalError as e:
                    if "no such table" in str(e):
                        return [None] * len(keys)
                    raise
                for k, name, val in cur:
                    if name in features:
                        got.setdefault(bytes(k), {})[name] = val
        finally:
            conn.close()
        return [got.get(k) for k in keys]

    def _client(self):
        if self._redis is None:
            from semalign.feature_repo.repo_config import redis_client

            self._redis = redis_client(self.settings.redis_url)
        return self._redis

    def _redis_rows(self, view, keys, features):
        import mmh3

        fields = [struct.pack("<I", mmh3.hash(f"{view}:{f}", signed=False)) for f in features]
        project = self.project.encode("utf8")
        with self._client().pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hmget(k + project, fields)
            replies = pipe.execute()
        return [None if all(v is None for v in vals) else {f: v for f, v in zip(features, vals) if v is not None}
                for vals in replies]

    def read_items(self, item_ids: list[str], version: str, levels: int, with_embedding: bool = False,
                   with_content: bool = False):
        """What `online.read_items` returns through Feast: (codes [n, levels + 1] with -1 where missing, found [n],
        emb, content), emb and content lists of vectors (None where missing, content empty where the version was
        published without it) or None when not asked for."""
        import numpy as np

        check_vectors_served(self.settings, with_embedding or with_content)
        keys = [entity_key({"codebook_version": version, "item_id": str(i)}) for i in item_ids]
        names = [f"sid_{lvl}" for lvl in range(levels)] + ["sid_dedup"]
        codes = np.full((len(item_ids), levels + 1), -1, np.int64)
        found = np.zeros(len(item_ids), bool)
        for j, row in enumerate(self.rows(SID_VIEW, keys, names)):
            vals = {n: value(row.get(n)) for n in names} if row else {}
            if isinstance(vals.get("sid_dedup"), int):
                codes[j] = [vals[n] if isinstance(vals[n], int) else 0 for n in names]
                found[j] = True
        wanted = ["embedding"] * with_embedding + ["content"] * with_content
        rows = self.rows(EMB_VIEW, keys, wanted) if wanted else []

        def vectors(name):
            out = []
            for row in rows:
                v = value(row.get(name)) if row else None
                out.append(np.asarray(v, np.float32) if isinstance(v, list) else None)
            return out

        return codes, found, vectors("embedding") if with_embedding else None, \
            vectors("content") if with_content else None


def check_vectors_served(settings, vectors: bool) -> None:
    """The compact serving profile's online store holds no vectors: asking for them is refused, by name."""
    if vectors and settings.serving_profile == "compact":
        raise FeatureStoreError("this store serves the compact profile (SEMALIGN_SERVING_PROFILE=compact): "
                                "its online store holds SID codes only, no vectors; read vectors offline "
                                "(historical) or serve the dense profile")


def sid_columns(item_ids: list[str], version: str, levels: int, codes, found, emb, with_embedding: bool,
                strict: bool) -> dict:
    """The columns of a `semantic_ids` answer: item_id, codebook_version, sid_0..sid_{L-1}, sid_dedup (and
    embedding; found with strict=False). Items the store does not hold raise ItemsNotFoundError when strict."""
    if strict and not found.all():
        raise ItemsNotFoundError(version, [i for i, f in zip(item_ids, found) if not f])
    cols = {"item_id": item_ids, "codebook_version": [version] * len(item_ids)}
    cols.update({f"sid_{lvl}": codes[:, lvl] for lvl in range(levels)})
    cols["sid_dedup"] = codes[:, levels]
    if with_embedding:
        cols["embedding"] = emb
    if not strict:
        cols["found"] = found
    return cols


def semantic_id_records(settings, item_ids, version: str | None = None, with_embedding: bool = False) -> list[dict]:
    """`SemanticIdStore(settings).semantic_ids(item_ids, version, with_embedding).to_dict("records")` without
    importing Feast or pandas: rows of Python values (the embedding as a list of floats)."""
    from semalign import state
    from semalign.feature_repo.catalogue import CodebookCatalogue

    settings.home.mkdir(parents=True, exist_ok=True)
    row = CodebookCatalogue(state.engine(settings.resolved_state_url()), settings.feast_project).published(version)
    version, levels = row["version"], row["levels"]
    item_ids = [str(i) for i in item_ids]
    codes, found, emb, _ = DirectOnlineReader(settings).read_items(item_ids, version, levels, with_embedding)
    cols = sid_columns(item_ids, version, levels, codes, found, emb, with_embedding, strict=True)
    out = []
    for j in range(len(item_ids)):
        r = {k: (v[j].tolist() if hasattr(v[j], "tolist") else v[j]) for k, v in cols.items()}
        if with_embedding:
            r["embedding"] = [float(x) for x in cols["embedding"][j]]
        out.append(r)
    return out
