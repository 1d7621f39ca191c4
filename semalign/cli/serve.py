"""`semalign serve`: the HTTP scoring API."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import HomeOpt, load_settings


def serve(home: Optional[Path] = HomeOpt,
          host: str = typer.Option("127.0.0.1", help="Bind address. Beyond loopback only with API keys "
                                   "(SEMALIGN_SERVE_API_KEYS_FILE) and SEMALIGN_SERVE_ALLOWED_HOSTS."),
          port: int = typer.Option(8000, help="Port."),
          workers: int = typer.Option(1, help="Worker processes."),
          check_interval: Optional[float] = typer.Option(
              None, help="Seconds between checks of the champion alias (default: SEMALIGN_SERVE_CHECK_INTERVAL, 30)."),
          max_candidates: Optional[int] = typer.Option(
              None, help="Largest accepted candidate list (default: SEMALIGN_SERVE_MAX_CANDIDATES, 1000).")):
    """HTTP scoring API: the champion ranker + Feast online features; new items scored from content."""
    import os

    import uvicorn

    from semalign.deploy.auth import KeyRing, check_bind

    s = load_settings(home, None, write=True)
    check_bind(host, KeyRing.from_settings(s), s.serve_allowed_hosts)  # before anything listens
    os.environ["SEMALIGN_HOME"] = str(s.home)
    # the workers read their settings from the environment: a flag given wins over it, an absent one leaves it be
    if check_interval is not None:
        os.environ["SEMALIGN_SERVE_CHECK_INTERVAL"] = str(check_interval)
    if max_candidates is not None:
        os.environ["SEMALIGN_SERVE_MAX_CANDIDATES"] = str(max_candidates)
    from semalign.deploy.serve import uvicorn_options

    uvicorn.run("semalign.deploy.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", **uvicorn_options(s))
