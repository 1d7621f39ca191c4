"""The online store: reads on the hot path and the two write paths.

Reads: Feast's provider `online_read` for prepared entity keys, decoded straight into
arrays, with no per-call registry lookups or response objects.

`FeatureStore._get_provider().online_read` is a private Feast API. It is called here and nowhere else, and
`tests/test_feature_store.py::test_the_online_reader_answers_like_get_online_features` pins its answers to
Feast's public `get_online_features`, so a Feast upgrade that changes it fails loudly."""
from __future__ import annotations

import numpy as np

USER_FEATURES = ("recent_items", "n_events", "positive_rate")


def _provider_read(fs, view, keys, names: list[str]):
    # a copy of the names: the Redis store appends its timestamp field to the list it is given
    return fs._get_provider().online_read(fs.config, view, keys, list(names))


def read_items(fs, sid_view, emb_view, item_ids: list[str], version: str, levels: int,
               with_embedding: bool = False, with_content: bool = False):
    """(codes [n, levels + 1] with -1 where missing, found [n], emb, content) of `item_ids` under `version`.
    emb and content are lists of vectors (None where missing; content is empty where the version was published
    without it), or None when not asked for."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    vval = Value(string_val=version)
    keys = [EntityKey(join_keys=["codebook_version", "item_id"], entity_values=[vval, Value(string_val=i)])
            for i in item_ids]
    names = [f"sid_{lvl}" for lvl in range(levels)] + ["sid_dedup"]
    res = _provider_read(fs, sid_view, keys, names)
    wanted = ["embedding"] * with_embedding + ["content"] * with_content
    res_emb = _provider_read(fs, emb_view, keys, wanted) if wanted else None
    codes = np.full((len(item_ids), levels + 1), -1, np.int64)
    found = np.zeros(len(item_ids), bool)
    for j, (_, vals) in enumerate(res):
        if vals and "sid_dedup" in vals and vals["sid_dedup"].HasField("int64_val"):
            codes[j] = [vals[n].int64_val for n in names]
            found[j] = True

    def vectors(name):  # None where the store holds no row (Redis answers an unset value, sqlite no key)
        return [np.asarray(v[name].float_list_val.val, np.float32)
                if v and name in v and v[name].HasField("float_list_val") else None for _, v in res_emb]

    return codes, found, vectors("embedding") if with_embedding else None, \
        vectors("content") if with_content else None


def read_reverse(fs, reverse_view, semantic_ids: list[str], version: str) -> list[str | None]:
    """The item each full semantic ID names under `version` (None where it names none)."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    vval = Value(string_val=version)
    keys = [EntityKey(join_keys=["codebook_version", "semantic_id"], entity_values=[vval, Value(string_val=s)])
            for s in semantic_ids]
    return [vals["item_id"].string_val if vals and "item_id" in vals and vals["item_id"].HasField("string_val")
            else None for _, vals in _provider_read(fs, reverse_view, keys, ["item_id"])]


def read_users(fs, user_view, user_ids: list[str], version: str) -> list[dict | None]:
    """Each user's recent items (newest last), event count and positive rate in snapshot `version`; None for
    users it lacks."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    vval = Value(string_val=version)
    keys = [EntityKey(join_keys=["user_id", "users_version"], entity_values=[Value(string_val=str(u)), vval])
            for u in user_ids]
    out = []
    for _, vals in _provider_read(fs, user_view, keys, USER_FEATURES):
        if not vals or not vals.get("n_events") or not vals["n_events"].HasField("int64_val"):
            out.append(None)
            continue
        out.append({"recent_items": list(vals["recent_items"].string_list_val.val),
                    "n_events": int(vals["n_events"].int64_val),
                    "positive_rate": float(vals["positive_rate"].float_val)})
    return out


def write_rows(fs, frames: dict, chunk: int = 20000, between=None) -> None:
    """Batch writes (a publish): each view's rows in chunks; `between` runs after each chunk."""
    for view, df in frames.items():
        for i in range(0, len(df), chunk):
            fs.write_to_online_store(view, df.iloc[i:i + chunk])
            if between is not None:
                between()


def push_rows(fs, frames: dict) -> None:
    """Small writes (onboarding) through each view's push source."""
    from feast.data_source import PushMode

    for view, df in frames.items():
        fs.push(f"{view}_push", df, to=PushMode.ONLINE)
