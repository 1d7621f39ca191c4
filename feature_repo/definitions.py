"""Feast definitions for semalign's item semantic IDs. Plain Feast: no semalign import, so `feast apply`
and any Feast client work on this folder as is.

Shape knobs (number of SID levels, offline store kind, table prefix) come from `semalign_repo.json` beside
this file when semalign renders the repo for a backend; without it the embedded defaults below apply.
"""
import json
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String

_here = Path(__file__).resolve().parent
_cfg = {"levels": 3, "offline": "file", "table_prefix": "semalign"}
if (_here / "semalign_repo.json").exists():
    _cfg.update(json.loads((_here / "semalign_repo.json").read_text()))
LEVELS = int(_cfg["levels"])
# Rows never expire (a SID is valid for as long as its codebook version exists), but ttl 0 would make
# `feast materialize-incremental` start one year back and skip rows stamped when an item became available
# (1970 where the data does not say): a long ttl starts it before them and keeps point-in-time joins unbounded
# in practice.
FOREVER = timedelta(days=365 * 150)


def _source(name: str):
    if _cfg["offline"] == "postgres":
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

        return PostgreSQLSource(name=f"{name}_source", table=f"{_cfg['table_prefix']}_{name}",
                                timestamp_field="event_timestamp", created_timestamp_column="created")
    # a folder of parquet files, one per published version plus one per onboarding batch
    return FileSource(name=f"{name}_source", path=f"data/offline/{name}", timestamp_field="event_timestamp",
                      created_timestamp_column="created")


item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
              description="A catalogue item (string id).")
codebook = Entity(name="codebook", join_keys=["codebook_version"], value_type=ValueType.STRING,
                  description="A codebook version; readers pin the version their ranker was trained with.")
semantic_id = Entity(name="semantic_id", join_keys=["semantic_id"], value_type=ValueType.STRING,
                     description="A full semantic ID under one codebook version: its codes and dedup level joined "
                                 "by '-', e.g. '12-5-200-0'.")
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A user (string id).")
user_snapshot = Entity(name="user_snapshot", join_keys=["users_version"], value_type=ValueType.STRING,
                       description="One refresh's user features; each ranker pins the snapshot it was trained with.")

item_sid_push = PushSource(name="item_semantic_id_push", batch_source=_source("item_semantic_id"),
                           description="New items' semantic IDs, pushed at onboarding time.")
item_embedding_push = PushSource(name="item_embedding_push", batch_source=_source("item_embedding"),
                                 description="New items' aligned and text-tower vectors, pushed at onboarding time.")

semantic_id_item_push = PushSource(name="semantic_id_item_push", batch_source=_source("semantic_id_item"),
                                   description="New items' semantic IDs as keys, pushed at onboarding time.")

item_semantic_id = FeatureView(
    name="item_semantic_id",
    entities=[item, codebook],
    ttl=FOREVER,
    schema=[Field(name=f"sid_{lvl}", dtype=Int64) for lvl in range(LEVELS)] + [Field(name="sid_dedup", dtype=Int64)],
    source=item_sid_push,
    online=True,
    description="Semantic ID of an item under one codebook version: one code per level, then the dedup level.",
    tags={"levels": str(LEVELS)},
)

item_embedding = FeatureView(
    name="item_embedding",
    entities=[item, codebook],
    ttl=FOREVER,
    schema=[Field(name="embedding", dtype=Array(Float32)), Field(name="content", dtype=Array(Float32))],
    source=item_embedding_push,
    online=True,
    description="The behavior-aligned content vector the item's semantic ID was assigned from (`embedding`) and "
                "the frozen text-tower vector it was encoded from (`content`, empty where not published), which "
                "the ranker reads beside it.",
)

semantic_id_item = FeatureView(
    name="semantic_id_item",
    entities=[semantic_id, codebook],
    ttl=FOREVER,
    schema=[Field(name="item_id", dtype=String)],
    source=semantic_id_item_push,
    online=True,
    description="Reverse lookup: the item a full semantic ID (with its dedup level) names under one codebook "
                "version; written with item_semantic_id, so both views always agree.",
)

user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user, user_snapshot],
    ttl=FOREVER,
    schema=[Field(name="recent_items", dtype=Array(String)), Field(name="n_events", dtype=Int64),
            Field(name="positive_rate", dtype=Float32)],
    source=_source("user_recent_items"),
    online=True,
    description="A user's most recent positive items (newest last) and activity counts, for the ranker's history, "
                "per snapshot: a refresh writes a new one, and a ranker reads the one it was trained with.",
)

# The default service; semalign registers one more per ranker version, tagged with its codebook version.
semantic_ids = FeatureService(name="semantic_ids", features=[item_semantic_id, item_embedding],
                              description="Item semantic IDs and aligned vectors (any codebook version).")
