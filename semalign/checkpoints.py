"""Named points inside multi-step writes where a fault-injection test can stop the process for real.

With SEMALIGN_PAUSE_AT=<name>, the process writes SEMALIGN_PAUSE_MARK (a file path) when it reaches <name>
and then waits, so a test can SIGKILL it at exactly that point. Unset (always, outside tests), this is one
environment lookup."""
import os
import time
from pathlib import Path


def checkpoint(name: str) -> None:
    if os.environ.get("SEMALIGN_PAUSE_AT") != name:
        return
    mark = os.environ.get("SEMALIGN_PAUSE_MARK")
    if mark:
        Path(mark).write_text(f"{name} {os.getpid()}\n")
    time.sleep(float(os.environ.get("SEMALIGN_PAUSE_S", "600")))
