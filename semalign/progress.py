"""Progress reporting for long work (rich), written to stderr so `--json` output stays clean."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class Reporter:
    """Hands out per-stage `advance(n)` callbacks; quiet=True shows nothing (tests, libraries)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._progress = None

    def __enter__(self):
        if not self.quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                      console=Console(stderr=True), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        if self._progress is None:
            yield lambda n=1, **info: None
            return
        task = self._progress.add_task(name, total=total, info="")

        def advance(n: int = 1, **info):
            self._progress.update(task, advance=n, info=" ".join(f"{k}={v}" for k, v in info.items()))

        try:
            yield advance
        finally:
            if total is not None:
                self._progress.update(task, completed=total)

    def log(self, msg: str):
        if self._progress is not None:
            self._progress.console.log(msg)
