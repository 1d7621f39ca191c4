"""The environment an in-process refresh gives Prefect, set before Prefect is imported (Prefect reads its
settings and configures logging at import): its home under SEMALIGN_HOME, its own logs off (errors reach the
user once, from the CLI; set PREFECT_LOGGING_LEVEL to see them), no analytics. Workers running scheduled
deployments import Prefect with their own environment and keep their logs."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def prepare(settings) -> None:
    os.environ.setdefault("PREFECT_HOME", str((settings.home / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "prefect" in sys.modules:  # imported earlier by the caller: its loggers were set up already
        logging.getLogger("prefect").setLevel(os.environ["PREFECT_LOGGING_LEVEL"])
