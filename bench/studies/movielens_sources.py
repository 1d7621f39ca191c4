"""Puts MovieLens-100K (as the loader reads it) where `bench/studies/sources_runs.py`'s runs read it from:
S3 daily partitions, Postgres tables and a positives-only folder. Prints each copy's dataset hash.

  AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_DEFAULT_REGION=us-east-1 \\
  python bench/studies/movielens_sources.py --data ../shared/data/movielens-100k --bucket mlbench \\
      --postgres postgresql://postgres@127.0.0.1:5432 --database semalign_bench_ml --implicit /tmp/ml_implicit

then `semalign run --data s3://mlbench/ml100k`, `--data postgresql://.../semalign_bench_ml`, `--data /tmp/ml_implicit`.
The database is dropped and created again; the data never enters this repository.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--bucket", default="mlbench")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--database", default="semalign_bench_ml")
    ap.add_argument("--implicit", required=True, help="folder for the positives-only copy")
    args = ap.parse_args()
    import boto3
    import pandas as pd
    import sqlalchemy as sa

    from semalign.data import load_dataset
    from semalign.sources import sql_driver_url

    ds = load_dataset(args.data)
    raw = pd.read_csv(Path(args.data) / "u.data", sep="\t", header=None,
                      names=["user_id", "item_id", "rating", "timestamp"])
    items = ds.items[["item_id", "text", "genres", "available_at"]].copy()
    # S3: items.parquet + interactions/dt=YYYY-MM-DD/part-0.parquet
    s3 = boto3.client("s3")
    if args.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=args.bucket)

    def put(key, frame):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        s3.put_object(Bucket=args.bucket, Key=key, Body=buf.getvalue())

    put("ml100k/items.parquet", items)
    events = raw.assign(user_id=raw["user_id"].astype(str), item_id=raw["item_id"].astype(str))
    day = pd.to_datetime(events["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    for d, part in events.groupby(day):
        put(f"ml100k/interactions/dt={d}/part-0.parquet", part.reset_index(drop=True))
    # Postgres: integer item ids, so the items table read ORDER BY item_id keeps the file's order
    admin = sa.create_engine(sql_driver_url(f"{args.postgres}/postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{args.database}"'))
    db = sa.create_engine(sql_driver_url(f"{args.postgres}/{args.database}"))
    items.assign(item_id=items["item_id"].astype(int)).to_sql("items", db, index=False)
    raw.to_sql("interactions", db, index=False)
    # positives only: the rating column dropped, the rows rated 4+ kept
    out = Path(args.implicit)
    out.mkdir(parents=True, exist_ok=True)
    items.to_parquet(out / "items.parquet", index=False)
    raw[raw["rating"] >= 4].drop(columns="rating").to_parquet(out / "interactions.parquet", index=False)
    for where in (args.data, f"s3://{args.bucket}/ml100k", f"{args.postgres}/{args.database}", str(out)):
        print(where, load_dataset(where).content_hash())


if __name__ == "__main__":
    main()
