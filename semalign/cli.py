"""The `semalign` command line. Heavy modules (torch, pandas, transformers) load inside commands only,
so `semalign --help` stays instant."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Behavior-aligned semantic IDs for cold-start CTR.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate a dataset.")
codebook_app = typer.Typer(no_args_is_help=True, help="Build and inspect semantic-ID codebooks.")
ids_app = typer.Typer(no_args_is_help=True, help="Semantic IDs in the feature store: publish and read.")
items_app = typer.Typer(no_args_is_help=True, help="Catalogue changes: onboard new items.")
app.add_typer(data_app, name="data")
app.add_typer(codebook_app, name="codebook")
app.add_typer(ids_app, name="ids")
app.add_typer(items_app, name="items")

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"semalign {version('semalign')}")
        raise typer.Exit()


@app.callback()
def _top(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the installed version and exit.")):
    """Behavior-aligned semantic IDs for cold-start CTR."""


DataOpt = typer.Option(None, "--data", help="Dataset folder (env SEMALIGN_DATA).")
HomeOpt = typer.Option(None, "--home", help="State directory (env SEMALIGN_HOME).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def _settings(home: Optional[Path], data: Optional[Path], write: bool = False, **kw):
    from semalign.config import get_settings

    s = get_settings(home=home, data=data, **kw)
    if write:  # commands that write under SEMALIGN_HOME find out it is unwritable before doing any work
        s.ensure_home()
    return s


def _emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=float) + "\n")
    else:
        render(result)


def _report(e: BaseException) -> None:
    from rich.console import Console

    con = Console(stderr=True, soft_wrap=True)
    con.print("[bold red]error:[/]", end=" ")
    con.print(e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e), markup=False, highlight=False)


def _fail(e: Exception) -> None:
    from semalign.errors import exit_code

    _report(e)
    raise typer.Exit(exit_code(e))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _print_summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for section, body in res.items():
        if not isinstance(body, dict):
            con.print(f"[bold]{section}[/]: {body}")
            continue
        t = Table(title=section, show_header=False, title_justify="left")
        for k, v in body.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    t.add_row(f"{k}.{k2}", _fmt(v2))
            elif k != "history":
                t.add_row(k, _fmt(v))
        con.print(t)


@data_app.command("check")
def data_check(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
               quarantine: bool = typer.Option(False, help="Drop bad rows into SEMALIGN_HOME/quarantine/ instead of failing.")):
    """Validate a dataset against the data contract and print its counts and split sizes."""
    from semalign.data import BUCKETS, item_buckets, settings_split
    from semalign.flows.semantic_ids import ingest

    s = _settings(home, data)
    ds = ingest(s, data, on_bad_rows="quarantine" if quarantine else "error")
    split = settings_split(ds, s)
    test_buckets = item_buckets(split.train_counts)[split.part("test")["item_idx"].to_numpy()]
    res = {"dataset": ds.name, "data": ds.report,
           "split": {"kind": split.kind, **split.events["part"].value_counts().to_dict(),
                     "cold_items": int(len(split.cold_items))},
           "test_events_by_bucket": {b: int((test_buckets == b).sum()) for b in BUCKETS}}
    _emit(res, as_json, _print_summary)


@app.command("encode")
def encode(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           images: bool = typer.Option(True, help="Use the image tower where items have images."),
           epochs: Optional[int] = typer.Option(None, help="Encoder epochs.")):
    """Embed items with the frozen towers (cached) and train the behavior-aware encoder."""
    from semalign.flows.semantic_ids import encoder_stage, ingest, tower_features
    from semalign.data import settings_split
    from semalign.progress import Reporter

    s = _settings(home, data, write=True, use_images=images, encoder_epochs=epochs)
    with Reporter(quiet=as_json) as rep:
        ds = ingest(s, data)
        split = settings_split(ds, s)
        feats = tower_features(s, ds, rep)
        enc = encoder_stage(s, ds, split, feats, rep)
    _emit({"encoder": {"version": enc.version, "reused": enc.reused, **enc.metrics}}, as_json, _print_summary)


@codebook_app.command("build")
def codebook_build(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
                   method: Optional[str] = typer.Option(None, help="rqkmeans (default) or rqvae."),
                   levels: Optional[int] = typer.Option(None, help="Levels (default 3)."),
                   codes: Optional[int] = typer.Option(None, help="Codes per level (default: sized to the catalogue)."),
                   parent: Optional[str] = typer.Option("latest", help="Parent version to stay stable against; 'none' for a fresh build."),
                   images: bool = typer.Option(True, help="Use the image tower where items have images.")):
    """Build a versioned codebook from the encoder's embeddings and assign SIDs to every item."""
    from semalign.flows.semantic_ids import semantic_ids_job
    from semalign.progress import Reporter

    s = _settings(home, data, write=True, use_images=images, codebook_method=method, codebook_levels=levels,
                  codebook_codes=codes)
    with Reporter(quiet=as_json) as rep:
        res = semantic_ids_job(s, data, rep, parent=None if parent == "none" else parent)
    _emit(res, as_json, _print_summary)


@codebook_app.command("list")
def codebook_list(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """List codebook versions under SEMALIGN_HOME (newest first)."""
    s = _settings(home, None)
    rows = []
    if s.codebooks_dir.exists():
        latest = (s.codebooks_dir / "LATEST").read_text().strip() if (s.codebooks_dir / "LATEST").exists() else None
        for meta_p in s.codebooks_dir.glob("*/codebook.json"):
            m = json.loads(meta_p.read_text())
            rows.append({"version": m["version"], "parent": m["parent"], "method": m["method"],
                         "levels": m["levels"], "codes": m["codes"], "data_hash": m["data_hash"],
                         "created_at": m["created_at"], "latest": m["version"] == latest})
    rows.sort(key=lambda r: -r["created_at"])

    def render(res):
        from rich.console import Console
        from rich.table import Table

        t = Table("version", "parent", "method", "levels x codes", "latest")
        for r in res["codebooks"]:
            t.add_row(r["version"], str(r["parent"]), r["method"], f"{r['levels']}x{r['codes']}", "*" if r["latest"] else "")
        Console().print(t)

    _emit({"codebooks": rows}, as_json, render)


@ids_app.command("publish")
def ids_publish(home: Optional[Path] = HomeOpt, data: Optional[Path] = DataOpt, as_json: bool = JsonOpt,
                version: Optional[str] = typer.Option(None, "--version", help="Codebook version (default: the latest built)."),
                current: bool = typer.Option(True, help="Make it the version unpinned readers get.")):
    """Publish a built codebook version's SIDs, aligned vectors and (with --data, or SEMALIGN_DATA) the items'
    text-tower vectors, which the default ranker reads, to the feature store (offline + online)."""
    import numpy as np

    from semalign.errors import NotFoundError
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.flows.semantic_ids import latest_codebook_version, load_codebook, load_sids

    s = _settings(home, data, write=True)
    version = version or latest_codebook_version(s)
    if version is None:
        raise NotFoundError(f"no codebook built under {s.codebooks_dir}: run `semalign run` first")
    cb = load_codebook(s, version)
    sids = load_sids(s, version)
    lineage_p = s.codebooks_dir / version / "lineage.json"
    enc_v = json.loads(lineage_p.read_text())["encoder_version"] if lineage_p.exists() else None
    content = None
    if s.data is not None:
        from semalign.flows.semantic_ids import ingest, item_rows, tower_features

        ds = ingest(s, s.data)
        content = tower_features(s, ds).text[item_rows(ds, sids["item_id"], f"codebook {version}")]
    res = SemanticIdStore(s, levels=cb.levels).publish(cb, sids["item_id"].tolist(), np.stack(sids["embedding"].to_numpy()),
                                                       encoder_version=enc_v, make_current=current, content=content)
    _emit({"publish": {"version": res.version, "items": res.items, "published_now": res.published,
                       "current": res.current, "wall_s": round(res.wall_s, 3)}}, as_json, _print_summary)


@ids_app.command("get")
def ids_get(items: list[str] = typer.Argument(..., help="Item ids."), home: Optional[Path] = HomeOpt,
            as_json: bool = JsonOpt,
            version: Optional[str] = typer.Option(None, "--version", help="Pinned codebook version (default: current)."),
            embedding: bool = typer.Option(False, help="Also return the aligned vector.")):
    """Read items' semantic IDs from the online store."""
    from semalign.feature_repo.store import SemanticIdStore

    s = _settings(home, None)
    df = SemanticIdStore(s).semantic_ids(items, version=version, with_embedding=embedding)
    rows = df.to_dict("records")
    for r in rows:
        if "embedding" in r:
            r["embedding"] = [float(x) for x in r["embedding"]]

    def render(res):
        from rich.console import Console
        from rich.table import Table

        t = Table("item_id", "codebook_version", "semantic id")
        for r in res["items"]:
            codes = [str(v) for k, v in r.items() if k.startswith("sid_")]
            t.add_row(r["item_id"], r["codebook_version"], "-".join(codes))
        Console().print(t)

    _emit({"items": rows}, as_json, render)


@items_app.command("add")
def items_add(file: Path = typer.Argument(..., help="csv, parquet or jsonl with item_id, text[, image_path]."),
              home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
              version: Optional[str] = typer.Option(None, "--version", help="Pinned codebook version (default: current).")):
    """Onboard new items: content -> encoder -> SID with the pinned codebook -> online + offline store."""
    import time

    import pandas as pd

    from semalign.feature_repo.store import SemanticIdStore

    s = _settings(home, None, write=True)
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        items = pd.read_csv(file, dtype={"item_id": str})
    elif suffix == ".parquet":
        items = pd.read_parquet(file)
    elif suffix in (".jsonl", ".json"):
        items = pd.read_json(file, lines=suffix == ".jsonl", dtype={"item_id": str})
    else:
        raise ValueError(f"{file}: expected .csv, .parquet or .jsonl, got '{suffix}'")
    missing = [c for c in ("item_id", "text") if c not in items.columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing}; expected item_id, text[, image_path]")
    if "image_path" in items:  # relative image paths are relative to the file
        items["image_path"] = [str((file.parent / p).resolve()) if isinstance(p, str) and p else None
                               for p in items["image_path"]]
    t0 = time.perf_counter()
    out = SemanticIdStore(s).onboard(items, version=version)
    res = {"items": out.to_dict("records"), "onboarded": int(out["onboarded"].sum()),
           "already_present": int((~out["onboarded"]).sum()), "wall_s": round(time.perf_counter() - t0, 3)}
    _emit(res, as_json, lambda r: _print_summary({"onboarding": {k: v for k, v in r.items() if k != "items"}}))


@app.command("run")
def run(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
        images: bool = typer.Option(True, help="Use the image tower where items have images.")):
    """The main job: the `refresh` flow in-process on embedded defaults. Ingest + validate -> encoder ->
    codebook -> publish SIDs to Feast -> train ranker -> evaluate vs champion -> gates -> MLflow -> promote.
    Exits 3 when the gates blocked the promotion (the verdict is in the output)."""
    from semalign.flows.refresh import run_refresh
    from semalign.progress import Reporter

    s = _settings(home, data, write=True, use_images=images)
    import contextlib

    # with --json, stdout carries only the JSON (MLflow prints run links to stdout)
    with contextlib.redirect_stdout(sys.stderr if as_json else sys.stdout), Reporter(quiet=as_json) as rep:
        res = run_refresh(s, data, rep)
    _emit(res, as_json, _print_refresh)
    if not (res.get("verdict") or {}).get("passed", True):
        from semalign.errors import EXIT_GATES_BLOCKED

        raise typer.Exit(EXIT_GATES_BLOCKED)


def _print_refresh(res: dict) -> None:
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
    for who in ("challenger", "champion"):
        m = ev.get(who)
        if m:
            t.add_row(f"{who} AUC", "  ".join(f"{b} {v['auc']:.4f}" for b, v in m.items()))
    v = res.get("verdict") or {}
    t.add_row("gates", v.get("summary") or ("passed" if v.get("passed") else "failed"))
    t.add_row("promoted", str(res.get("promoted")))
    t.add_row("champion", str(res.get("champion")))
    if res.get("note"):
        t.add_row("note", res["note"])
    t.add_row("wall time", f"{res['wall_s']} s")
    con.print(t)


@app.command("schedule")
def schedule(cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 3 * * *".'),
             data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
             pool: str = typer.Option("semalign", help="Prefect process work pool (created if missing)."),
             name: str = typer.Option("semalign-refresh", help="Deployment name."),
             timezone: str = typer.Option("UTC", help="Time zone of the cron schedule.")):
    """Create a Prefect deployment of `refresh` on a cron schedule (needs PREFECT_API_URL: a Prefect server;
    runs happen on a worker: `prefect worker start --pool semalign`)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        _fail(ValueError("set PREFECT_API_URL to a Prefect server (start one with `prefect server start`); "
                         "`semalign run` runs the flow in-process without one"))
    s = _settings(home, data)
    from semalign.flows.deployment import schedule as make_schedule

    res = make_schedule(str(s.resolved_data()), str(s.home), cron, pool=pool, name=name, timezone=timezone)
    _emit({"schedule": res}, as_json, _print_summary)


@app.command("serve")
def serve(home: Optional[Path] = HomeOpt,
          host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless you mean otherwise)."),
          port: int = typer.Option(8000, help="Port."),
          workers: int = typer.Option(1, help="Worker processes."),
          check_interval: float = typer.Option(30.0, help="Seconds between checks of the champion alias."),
          max_candidates: int = typer.Option(1000, help="Largest accepted candidate list.")):
    """HTTP scoring API: the champion ranker + Feast online features; new items scored from content."""
    import os

    import uvicorn

    s = _settings(home, None, write=True)
    os.environ["SEMALIGN_HOME"] = str(s.home)
    os.environ["SEMALIGN_SERVE_CHECK_INTERVAL"] = str(check_interval)
    os.environ["SEMALIGN_SERVE_MAX_CANDIDATES"] = str(max_candidates)
    uvicorn.run("semalign.deploy.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning")


@app.command("report")
def report(home: Optional[Path] = HomeOpt, out: Path = typer.Option(Path("semalign-report.html"), "--out", help="HTML file to write."),
           run_id: Optional[str] = typer.Option(None, help="MLflow run (default: the last refresh).")):
    """Write one self-contained HTML page of the last refresh (gates, AUC per bucket, drift, plots, audit)."""
    from semalign.deploy.report import build_report

    s = _settings(home, None)
    path = build_report(s, out, run_id)
    sys.stdout.write(f"{path}\n")


@app.command("promote")
def promote(version: str = typer.Argument(..., help="Registered model version to make champion."),
            home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
            reason: str = typer.Option("manual promotion", help="Recorded in the audit history.")):
    """Move the `champion` alias to a model version (and the store's current codebook with it)."""
    from semalign.deploy.registry import Registry

    s = _settings(home, None, write=True)
    res = Registry(s).promote(version, reason=reason)
    _emit({"promote": res}, as_json, _print_summary)


@app.command("rollback")
def rollback(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
             to: Optional[str] = typer.Option(None, "--to", help="Version to roll back to (default: the previous champion)."),
             reason: str = typer.Option("manual rollback", help="Recorded in the audit history.")):
    """Move `champion` back to the previous champion (one alias move, audited)."""
    from semalign.deploy.registry import Registry

    s = _settings(home, None, write=True)
    res = Registry(s).rollback(to=to, reason=reason)
    _emit({"rollback": res}, as_json, _print_summary)


@app.command("status")
def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           history: int = typer.Option(10, help="Audit entries to show.")):
    """Who is champion, since when and why, the last gate's verdict, and the audit history."""
    from semalign.deploy.registry import Registry

    s = _settings(home, None)
    reg = Registry(s)
    res = reg.status()
    res["history"] = [{k: r[k] for k in ("at", "action", "subject", "from_value", "to_value", "actor")}
                      | {"reason": (r["reason"] or "")[:200]} for r in reg.history(limit=history)]

    def render(r):
        from rich.console import Console
        from rich.table import Table

        con = Console()
        champ = r["champion"] or {}
        con.print(f"[bold]{r['model']}[/] champion: v{champ.get('version')} (codebook {champ.get('codebook_version')}), "
                  f"since {time.ctime(r['champion_since']) if r['champion_since'] else '-'}: {r['champion_reason']}")
        if r.get("last_gate"):
            g = r["last_gate"]
            con.print(f"last gate: v{g['version']} {'passed' if g['passed'] else 'FAILED'}: {g.get('summary', '')}")
        if r.get("warning"):
            con.print(f"[yellow]warning:[/] {r['warning']}")
        t = Table("when", "action", "subject", "from", "to", "by")
        for h in r["history"]:
            t.add_row(time.ctime(h["at"]), h["action"], h["subject"], str(h["from_value"]), str(h["to_value"]), h["actor"] or "")
        con.print(t)

    import time

    _emit(res, as_json, render)


@app.command("experiment")
def experiment(data: Optional[Path] = DataOpt, home: Optional[Path] = HomeOpt,
               split: str = typer.Option("cold-items", help="cold-items | temporal"),
               seeds: int = typer.Option(5, help="Number of seeds (split, encoder, codebook, rankers)."),
               seed_start: int = typer.Option(0, help="First seed: runs seeds seed_start .. seed_start + seeds - 1."),
               models: str = typer.Option("full,id_only,content,aligned_content,sid_ngram,logreg",
                                          help="Comma-separated ranker variants; 'full@lever=value+lever=value' "
                                               "trains a variant with other levers (ablations)."),
               merge: Optional[list[Path]] = typer.Option(None, help="Merge these result files (written with "
                                                          "--json) into one table; trains nothing."),
               served: Optional[str] = typer.Option(None, help="With --merge: the model the deltas are taken for."),
               json_path: Optional[Path] = typer.Option(None, "--json", help="Write long-form results here (+ .md, plots)."),
               images: bool = typer.Option(True, help="Use the image tower where items have images."),
               no_cross: bool = typer.Option(False, "--no-cross-attention", help="Ablation: modal + behavior attention only."),
               random_align: bool = typer.Option(False, "--random-align-init", help="Ablation: random-init alignment tables."),
               codebook_method: Optional[str] = typer.Option(None, "--codebook-method", help="rqkmeans | rqvae (ablation)."),
               id_dropout: Optional[float] = typer.Option(None, help="Share of item-ID lookups replaced by OOV in training."),
               max_epochs: Optional[int] = typer.Option(None, help="Ranker epoch budget (early stopping on validation)."),
               bootstrap: int = typer.Option(200, help="Bootstrap resamples for the intervals.")):
    """Train every ranker variant per seed and compare them per item bucket (AUC, GAUC, LogLoss) with
    95% paired bootstrap intervals on the deltas of the served variant (SEMALIGN_RANKER_VARIANT)."""
    from semalign.flows.experiment import merge_experiments, run_experiment
    from semalign.progress import Reporter

    if merge:
        with Reporter() as rep:
            res = merge_experiments(merge, json_path, n_boot=bootstrap, rep=rep, served=served)
        sys.stdout.write(res["markdown"] + f"\n\nseeds {res['seeds']}; summed wall time of the runs (runs in parallel overlap): {res['wall_s']} s\n")
        return
    s = _settings(home, data, write=True, use_images=images, codebook_method=codebook_method)
    over = {"cross_attention": not no_cross, "align_init": "random" if random_align else "zero"}
    if id_dropout is not None:
        over["id_dropout"] = id_dropout
    if max_epochs is not None:
        over["max_epochs"] = max_epochs
    with Reporter() as rep:
        res = run_experiment(s, data, split, seeds, [m.strip() for m in models.split(",") if m.strip()],
                             json_path, over, n_boot=bootstrap, rep=rep, seed_start=seed_start)
    sys.stdout.write(res["markdown"] + f"\n\nwall time: {res['wall_s']} s\n")


# what `main` reports as a message with exit code 1 instead of a traceback: semalign's own errors, and the
# standard ones its checks raise on bad input (pydantic's settings errors are ValueErrors)
HANDLED = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError)


def main():
    """Entry point: every handled error is reported here, once (exit codes: semalign/errors.py)."""
    from semalign.errors import SemalignError, exit_code

    try:
        app()
    except (SemalignError,) + HANDLED as e:
        _report(e)
        sys.exit(exit_code(e))


if __name__ == "__main__":
    main()
