"""`semalign experiment`: every ranker variant per seed, compared per item bucket with bootstrap intervals."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import DataOpt, HomeOpt, ImagesOpt, JsonOpt, OutOpt, emit, load_settings

DEFAULT_MODELS = "full,id_only,content,aligned_content,sid_ngram,logreg"


def experiment(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt,
               split: str = typer.Option("cold-items", help="cold-items | temporal"),
               seeds: int = typer.Option(5, help="Number of seeds (split, encoder, codebook, rankers)."),
               seed_start: int = typer.Option(0, help="First seed: runs seeds seed_start .. seed_start + seeds - 1."),
               models: str = typer.Option(DEFAULT_MODELS,
                                          help="Comma-separated ranker variants; 'full@lever=value+lever=value' "
                                               "trains a variant with other levers (ablations); "
                                               "'sid@codebook_levels=4+codebook_codes=512' reads SIDs of a "
                                               "codebook of that size (built once per size and seed)."),
               merge: Optional[list[Path]] = typer.Option(None, help="Merge these result files (written with "
                                                          "--out) into one table; trains nothing."),
               served: Optional[str] = typer.Option(None, help="With --merge: the model the deltas are taken for."),
               out: Optional[Path] = OutOpt, as_json: bool = JsonOpt,
               images: bool = ImagesOpt,
               no_cross: bool = typer.Option(False, "--no-cross-attention", help="Ablation: modal + behavior attention only."),
               random_align: bool = typer.Option(False, "--random-align-init", help="Ablation: random-init alignment tables."),
               codebook_method: Optional[str] = typer.Option(None, "--codebook-method", help="rqkmeans | rqvae (ablation)."),
               id_dropout: Optional[float] = typer.Option(None, help="Share of item-ID lookups replaced by OOV in training."),
               max_epochs: Optional[int] = typer.Option(None, help="Ranker epoch budget (early stopping on validation)."),
               id_buckets: Optional[int] = typer.Option(None, help="Bounded item-ID table: rows every model's ID "
                                                        "table (sid: n-gram table) gets; 0 = one row per item."),
               items_per_row: Optional[float] = typer.Option(None, help="Bounded item-ID table as catalogue items "
                                                             "per row (rows = items / ratio); a model's own "
                                                             "'@items_per_row=' or '@id_buckets=' wins."),
               bootstrap: int = typer.Option(200, help="Bootstrap resamples for the intervals."),
               select: bool = typer.Option(False, "--select", help="Pick the model with the best pseudo-cold "
                                           "validation GAUC and write it as the ranker spec the refresh trains "
                                           "and serves (<home>/ranker_spec.json, or SEMALIGN_RANKER_SPEC).")):
    """Train every ranker variant per seed and compare them per item bucket (AUC, GAUC, LogLoss) with
    95% paired bootstrap intervals on the deltas of the served variant (SEMALIGN_RANKER_VARIANT).

    Prints the tables. --out PATH also writes the long-form results to PATH,
    and beside it .md, AUC/GAUC plots and the per-event test predictions
    (.preds.npz) that --merge reads. --json prints the results as JSON instead."""
    import contextlib

    from semalign.flows.experiment import merge_experiments, run_experiment
    from semalign.progress import Reporter

    s = load_settings(home, data, write=True, use_images=images, codebook_method=codebook_method) \
        if select or not merge else None
    # with --json, stdout carries only the JSON
    with contextlib.redirect_stdout(sys.stderr if as_json else sys.stdout), Reporter(quiet=as_json) as rep:
        if merge:
            res = merge_experiments(merge, out, n_boot=bootstrap, rep=rep, served=served)
        else:
            over = rank_overrides(no_cross, random_align, id_dropout, max_epochs, id_buckets, items_per_row)
            res = run_experiment(s, data, split, seeds, [m.strip() for m in models.split(",") if m.strip()],
                                 out, over, n_boot=bootstrap, rep=rep, seed_start=seed_start)
    if select:
        from semalign.spec import write_selection

        res["selected"] = write_selection(s, res)
    emit(res, as_json, print_merged if merge else print_experiment)


def rank_overrides(no_cross: bool, random_align: bool, id_dropout: Optional[float], max_epochs: Optional[int],
                   id_buckets: Optional[int] = None, items_per_row: Optional[float] = None) -> dict:
    """The ranker levers the command line sets for every model of the run."""
    if id_buckets is not None and items_per_row is not None:
        raise typer.BadParameter("give --id-buckets or --items-per-row, not both")
    over = {"cross_attention": not no_cross, "align_init": "random" if random_align else "zero"}
    if id_buckets is not None:
        over["id_buckets"] = id_buckets
    if items_per_row is not None:
        over["items_per_row"] = items_per_row
    if id_dropout is not None:
        over["id_dropout"] = id_dropout
    if max_epochs is not None:
        over["max_epochs"] = max_epochs
    return over


def print_experiment(res: dict) -> None:
    sys.stdout.write(res["markdown"] + f"\n\nwall time: {res['wall_s']} s\n")
    print_selected(res)


def print_selected(res: dict) -> None:
    sel = res.get("selected")
    if sel:
        v = sel["selection"]["validation"][sel["model"]]["val_cold_gauc"]
        sys.stdout.write(f"\nselected {sel['model']} (pseudo-cold validation GAUC {100 * v:.2f}); the refresh now "
                         f"trains and serves it: {sel['path']}\n")


def print_merged(res: dict) -> None:
    sys.stdout.write(res["markdown"] + f"\n\nseeds {res['seeds']}; summed wall time of the runs "
                     f"(runs in parallel overlap): {res['wall_s']} s\n")
    print_selected(res)
