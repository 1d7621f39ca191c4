"""The `semalign` command line: the app, its command groups and the entry point with the central error handling.
The commands live in small modules (data, pipeline, refresh, experiment, ids, registry, serve) whose heavy
imports (torch, pandas, transformers, feast, mlflow, prefect) happen inside the commands only, so
`semalign --help` stays instant."""
from __future__ import annotations

import sys

import typer

from semalign.cli import data, experiment, ids, pipeline, refresh, registry, serve
from semalign.cli.common import report_error, report_internal

EXIT_CODES = ("Exit codes: 0 ok; 1 failed (a handled error: bad input, a store or server unreachable, a lock "
              "held; one line on stderr); 2 usage (unknown command or option, a bad option value); 3 the gates "
              "blocked the promotion (`semalign run`: the verdict is in the output); 4 internal error (a bug: "
              "the traceback on stderr).")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Behavior-aligned semantic IDs for cold-start CTR.",
                  epilog=EXIT_CODES)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and synthesise datasets.")
codebook_app = typer.Typer(no_args_is_help=True, help="Build and inspect semantic-ID codebooks.")
ids_app = typer.Typer(no_args_is_help=True, help="Semantic IDs in the feature store: publish, read, reverse lookup, diff, tokenizer bundle.")
items_app = typer.Typer(no_args_is_help=True, help="Catalogue changes: onboard new items.")
app.add_typer(data_app, name="data")
app.add_typer(codebook_app, name="codebook")
app.add_typer(ids_app, name="ids")
app.add_typer(items_app, name="items")

# the commands, in the order `semalign --help` lists them
data_app.command("check")(data.data_check)
data_app.command("synth")(data.data_synth)
app.command("encode")(pipeline.encode)
codebook_app.command("build")(pipeline.codebook_build)
codebook_app.command("list")(pipeline.codebook_list)
ids_app.command("publish")(ids.ids_publish)
ids_app.command("get")(ids.ids_get)
ids_app.command("items")(ids.ids_items)
ids_app.command("diff")(ids.ids_diff)
ids_app.command("similar")(ids.ids_similar)
ids_app.command("bundle")(ids.ids_bundle)
items_app.command("add")(ids.items_add)
app.command("run")(refresh.run)
app.command("schedule")(refresh.schedule)
app.command("serve")(serve.serve)
app.command("report")(registry.report)
app.command("promote")(registry.promote)
app.command("rollback")(registry.rollback)
app.command("vouch")(registry.vouch)
app.command("status")(registry.status)
app.command("unlock")(registry.unlock)
app.command("experiment")(experiment.experiment)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"semalign {version('semalign')}")
        raise typer.Exit()


@app.callback()
def _top(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the installed version and exit.")):
    """Behavior-aligned semantic IDs for cold-start CTR."""


def legacy_out(argv: list[str]) -> list[str]:
    """`semalign experiment ... --json PATH` is the old spelling of `--out PATH` (--json is now a flag): rewrite
    it, with one line on stderr, so scripts that use it keep working."""
    cmd = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if cmd is None or argv[cmd] != "experiment":
        return argv
    args = list(argv)
    for i in range(cmd + 1, len(args)):
        if args[i] == "--":
            break
        if args[i] == "--json" and i + 1 < len(args) and not args[i + 1].startswith("-"):
            args[i] = "--out"
        elif args[i].startswith("--json=") and not args[i][len("--json="):].startswith("-"):
            args[i] = "--out=" + args[i][len("--json="):]
    if args != argv:
        sys.stderr.write("semalign experiment: `--json PATH` is deprecated, use `--out PATH` "
                         "(--json now prints the results as JSON on stdout)\n")
    return args


# what `main` reports as a message with exit code 1 instead of a traceback, besides semalign's own errors: the
# file system's answer about a path (a file a command was given and cannot open, a home it may not write)
OS_FACTS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main():
    """Entry point: every handled error is reported here, once (exit codes: semalign/errors.py). semalign's errors
    print their message and exit with their code; any other exception is a bug, not the user's mistake: its
    traceback goes to stderr with an `internal error` line, exit code 4."""
    from semalign.errors import EXIT_INTERNAL, SemalignError, exit_code

    try:
        app(args=legacy_out(sys.argv[1:]))
    except (SemalignError,) + OS_FACTS as e:
        report_error(e)
        sys.exit(exit_code(e))
    except Exception as e:
        report_internal(e)
        sys.exit(EXIT_INTERNAL)
