"""The main job and its schedule: `semalign run` (the refresh flow in-process) and `semalign schedule`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import DataOpt, HomeOpt, ImagesOpt, JsonOpt, RayOpt, emit, fail, load_settings, print_summary


def run(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
        images: bool = ImagesOpt, ray: Optional[str] = RayOpt,
        quarantine: bool = typer.Option(False, "--quarantine", help="Set bad rows aside under "
                                        "SEMALIGN_HOME/quarantine/ (counts in the output) instead of refusing the "
                                        "dataset (env SEMALIGN_ON_BAD_ROWS=quarantine).")):
    """The main job: the `refresh` flow in-process on embedded defaults. Ingest + validate -> encoder ->
    codebook -> publish SIDs to Feast -> train ranker -> evaluate vs champion -> gates -> MLflow -> promote.
    Exits 3 when the gates blocked the promotion (the verdict is in the output)."""
    import contextlib

    from semalign.flows import prefect_env
    from semalign.progress import Reporter

    s = load_settings(home, data, write=True, use_images=images, on_bad_rows="quarantine" if quarantine else None,
                      ray_address=ray)
    prefect_env.prepare(s)  # before Prefect is imported: it reads its settings and sets up logging then
    from semalign.flows.refresh import run_refresh

    # with --json, stdout carries only the JSON (MLflow prints run links to stdout)
    with contextlib.redirect_stdout(sys.stderr if as_json else sys.stdout), Reporter(quiet=as_json) as rep:
        res = run_refresh(s, data, rep)
    emit(res, as_json, print_refresh)
    if not (res.get("verdict") or {}).get("passed", True):
        from semalign.errors import EXIT_GATES_BLOCKED

        raise typer.Exit(EXIT_GATES_BLOCKED)


def print_refresh(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="refresh", show_header=False, title_justify="left")
    t.add_row("dataset", f"{res['dataset']} ({res['data'].get('items')} items, {res['data'].get('interactions')} events)")
    t.add_row("encoder", f"{res['encoder']['version']}" + (" (reused)" if res["encoder"]["reused"] else ""))
    cb = res["codebook"]
    churn = f", churn vs parent {cb['churn']['churn']:.3f}" if cb.get("churn") else ""
    t.add_row("codebook", f"{cb['version']}" + (" (reused)" if cb["reused"] else "") + churn)
    fs = res.get("feature_store") or {}
    t.add_row("feature store", f"{fs.get('version')} {'published' if fs.get('published_now') else 'already published'}"
              f" ({fs.get('online_store')}, current: {fs.get('current')})")
    t.add_row("ranker", f"model version {res.get('model_version')}" + (" (reused)" if res["ranker"].get("reused") else ""))
    ev = res.get("evaluation") or {}
    cmp = ev.get("compared") or {}
    rows = [("challenger AUC", ev.get("challenger"))]
    if ev.get("champion"):  # both on the events the champion never trained on
        on = f" ({cmp.get('events')} of {cmp.get('test_events')} test events)" if cmp else ""
        rows = [(f"challenger AUC{on}", cmp.get("challenger") or ev.get("challenger")),
                (f"champion AUC{on}", ev["champion"])]
    for label, m in rows:
        if m:
            t.add_row(label, "  ".join(f"{b} {v['auc']:.4f}" for b, v in m.items()))
    v = res.get("verdict") or {}
    t.add_row("gates", v.get("summary") or ("passed" if v.get("passed") else "failed"))
    t.add_row("promoted", str(res.get("promoted")))
    t.add_row("champion", str(res.get("champion")))
    if res.get("note"):
        t.add_row("note", res["note"])
    t.add_row("wall time", f"{res['wall_s']} s")
    con.print(t)


def schedule(cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 3 * * *".'),
             data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
             pool: str = typer.Option("semalign", help="Prefect process work pool (created if missing)."),
             name: str = typer.Option("semalign-refresh", help="Deployment name."),
             timezone: str = typer.Option("UTC", help="Time zone of the cron schedule."),
             ray: Optional[str] = RayOpt):
    """Create a Prefect deployment of `refresh` on a cron schedule (needs PREFECT_API_URL: a Prefect server;
    runs happen on a worker: `prefect worker start --pool semalign`)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        from semalign.errors import InvalidInputError

        fail(InvalidInputError("set PREFECT_API_URL to a Prefect server (start one with `prefect server start`); "
                               "`semalign run` runs the flow in-process without one"))
    s = load_settings(home, data, ray_address=ray)
    from semalign.flows.deployment import schedule as make_schedule

    res = make_schedule(str(s.resolved_data()), str(s.home), cron, pool=pool, name=name, timezone=timezone,
                        ray_address=ray)
    emit({"schedule": res}, as_json, print_summary)
