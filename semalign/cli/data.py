"""`semalign data check`: validate a dataset against the data contract."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import DataOpt, HomeOpt, JsonOpt, emit, load_settings, print_summary


def data_check(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
               quarantine: bool = typer.Option(False, help="Drop bad rows into SEMALIGN_HOME/quarantine/ instead of failing.")):
    """Validate a dataset against the data contract and print its counts and split sizes."""
    from semalign.data import BUCKETS, item_buckets, settings_split
    from semalign.flows.semantic_ids import ingest

    s = load_settings(home, data)
    ds = ingest(s, data, on_bad_rows="quarantine" if quarantine else "error")
    split = settings_split(ds, s)
    test_buckets = item_buckets(split.train_counts)[split.part("test")["item_idx"].to_numpy()]
    res = {"dataset": ds.name, "hash": ds.content_hash(), "data": ds.report,
           "split": {"kind": split.kind, **split.events["part"].value_counts().to_dict(),
                     "cold_items": int(len(split.cold_items))},
           "test_events_by_bucket": {b: int((test_buckets == b).sum()) for b in BUCKETS}}
    emit(res, as_json, print_summary)


def data_synth(out: Path = typer.Option(..., "--out", help="Folder to write (items.parquet, interactions.parquet)."),
               items: int = typer.Option(10_000, "--items", min=1, help="Catalogue size."),
               users: Optional[int] = typer.Option(None, "--users", min=1, help="Users (default: items / 2)."),
               events: Optional[int] = typer.Option(None, "--events", min=1, help="Events (default: 10 x items)."),
               seed: int = typer.Option(0, "--seed", help="Same seed, same arguments: byte-identical files."),
               images: int = typer.Option(0, "--images", min=0, help="Items that get a small PNG under images/."),
               topics: int = typer.Option(32, "--topics", min=1, help="Latent topics (categories)."),
               force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
               as_json: bool = JsonOpt):
    """Write a deterministic synthetic catalogue in the data contract: Zipf item popularity, user sessions, topic
    texts, learnable click labels, late-introduced items."""
    from semalign.progress import Reporter
    from semalign.synth import SynthConfig, check_out, generate

    cfg = SynthConfig(items=items, users=users, events=events, seed=seed, images=images, topics=topics).resolved()
    check_out(out, force)  # before any progress bar is drawn
    with Reporter(quiet=as_json) as rep, rep.stage("items", cfg.items) as adv_items, \
            rep.stage("events", cfg.events) as adv_events:
        advance = {"items": adv_items, "events": adv_events}
        res = generate(out, cfg, force=force, progress=lambda stage, n: advance[stage](n))
    emit(res, as_json, print_summary)
