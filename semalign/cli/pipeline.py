"""The semantic-ID stages one at a time: `semalign encode`, `semalign codebook build`, `semalign codebook list`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import DataOpt, HomeOpt, ImagesOpt, JsonOpt, emit, load_settings, print_summary

def encode(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           images: bool = ImagesOpt, epochs: Optional[int] = typer.Option(None, help="Encoder epochs.")):
    """Embed items with the frozen towers (cached) and train the behavior-aware encoder."""
    from semalign.flows.pipeline import upstream
    from semalign.progress import Reporter

    s = load_settings(home, data, write=True, use_images=images, encoder_epochs=epochs)
    with Reporter(quiet=as_json) as rep:
        enc = upstream(s, data, rep, through="encoder").enc
    emit({"encoder": {"version": enc.version, "reused": enc.reused, **enc.metrics}}, as_json, print_summary)


def codebook_build(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
                   method: Optional[str] = typer.Option(None, help="rqkmeans (default) or rqvae."),
                   levels: Optional[int] = typer.Option(None, help="Levels (default 3)."),
                   codes: Optional[int] = typer.Option(None, help="Codes per level (default: sized to the catalogue)."),
                   parent: Optional[str] = typer.Option("latest", help="Parent version to stay stable against; 'none' for a fresh build."),
                   images: bool = ImagesOpt):
    """Build a versioned codebook from the encoder's embeddings and assign SIDs to every item."""
    from semalign.flows.semantic_ids import semantic_ids_job
    from semalign.progress import Reporter

    s = load_settings(home, data, write=True, use_images=images, codebook_method=method, codebook_levels=levels,
                      codebook_codes=codes)
    from semalign.flows.lock import refresh_lock

    with refresh_lock(s, "codebook build"), Reporter(quiet=as_json) as rep:  # it moves LATEST and publishes
        res = semantic_ids_job(s, data, rep, parent=None if parent == "none" else parent)
    emit(res, as_json, print_summary)


def codebook_list(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """List codebook versions under SEMALIGN_HOME (newest first)."""
    s = load_settings(home, None)
    rows = []
    if s.codebooks_dir.exists():
        latest = (s.codebooks_dir / "LATEST").read_text().strip() if (s.codebooks_dir / "LATEST").exists() else None
        for meta_p in s.codebooks_dir.glob("*/codebook.json"):
            m = json.loads(meta_p.read_text())
            rows.append({"version": m["version"], "parent": m["parent"], "method": m["method"],
                         "levels": m["levels"], "codes": m["codes"], "data_hash": m["data_hash"],
                         "created_at": m["created_at"], "latest": m["version"] == latest})
    rows.sort(key=lambda r: -r["created_at"])
    emit({"codebooks": rows}, as_json, _print_codebooks)


def _print_codebooks(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("version", "parent", "method", "levels x codes", "latest")
    for r in res["codebooks"]:
        t.add_row(r["version"], str(r["parent"]), r["method"], f"{r['levels']}x{r['codes']}", "*" if r["latest"] else "")
    Console().print(t)
