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
    res = {"dataset": ds.name, "data": ds.report,
           "split": {"kind": split.kind, **split.events["part"].value_counts().to_dict(),
                     "cold_items": int(len(split.cold_items))},
           "test_events_by_bucket": {b: int((test_buckets == b).sum()) for b in BUCKETS}}
    emit(res, as_json, print_summary)
