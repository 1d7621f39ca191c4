"""What the command modules share: the common options, settings, output (human or `--json`) and error reporting.
Nothing heavy is imported at module level, so `semalign --help` stays instant."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

# kept as text: a URI (s3://bucket/prefix, postgresql://...) would lose a slash as a Path
DataOpt = typer.Option(None, "--data", parser=str, help="Dataset: a folder, s3://bucket/prefix or a database URL "
                       "(env SEMALIGN_DATA).")
HomeOpt = typer.Option(None, "--home", help="State directory (env SEMALIGN_HOME).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
# None when not given, so SEMALIGN_USE_IMAGES decides (default: on); a flag given wins over the environment
ImagesOpt = typer.Option(None, "--images/--no-images", show_default=False,
                         help="Use the image tower where items have images [default: SEMALIGN_USE_IMAGES, on].")
RayOpt = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the heavy compute (tower and encoder inference, "
                     "ranker training) on the Ray cluster at ADDRESS (host:port, auto, ray://host:10001; env "
                     "SEMALIGN_RAY_ADDRESS). Unset: everything in this process.")
OutOpt = typer.Option(None, "--out", help="Write the results (JSON) to this file, companion files (.md, plots) beside it.")


def load_settings(home: Optional[Path], data: Optional[Path], write: bool = False, **kw):
    from semalign.config import get_settings

    s = get_settings(home=home, data=data, **kw)
    if write:  # commands that write under SEMALIGN_HOME find out it is unwritable before doing any work
        s.ensure_home()
    return s


def emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=float) + "\n")
    else:
        render(result)


def report_error(e: BaseException) -> None:
    from rich.console import Console

    con = Console(stderr=True, soft_wrap=True)
    con.print("[bold red]error:[/]", end=" ")
    con.print(e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e), markup=False, highlight=False)


def report_internal(e: BaseException) -> None:
    """An exception semalign does not handle: a bug. The traceback, then one line saying so."""
    import traceback

    traceback.print_exception(e, file=sys.stderr)
    sys.stderr.write(f"internal error: {type(e).__name__} (a bug in semalign, not a problem with your input; "
                     "the traceback above says where)\n")


def fail(e: Exception) -> None:
    from semalign.errors import exit_code

    report_error(e)
    raise typer.Exit(exit_code(e))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def print_summary(res: dict) -> None:
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
                    t.add_row(f"{k}.{k2}", fmt(v2))
            elif k != "history":
                t.add_row(k, fmt(v))
        con.print(t)
