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
          check_interval: float = typer.Option(30.0, help="Seconds between checks of the champion alias."),
          max_candidates: int = typer.Option(1000, help="Largest accepted candidate list.")):
    """HTTP scoring API: the champion ranker + Feast online features; new items scored from content."""
    import os

    import uvicorn

    from semalign.deploy.auth import KeyRing, check_bind

    s = load_settings(home, None, write=True)
    check_bind(host, KeyRing.from_settings(s), s.serve_allowed_hosts)  # before anything listens
    os.environ["SEMALIGN_HOME"] = str(s.home)
    os.environ["SEMALIGN_SERVE_CHECK_INTERVAL"] = str(check_interval)
    os.environ["SEMALIGN_SERVE_MAX_CANDIDATES"] = str(max_candidates)
    uvicorn.run("semalign.deploy.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning")
