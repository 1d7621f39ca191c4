"""Named points inside multi-step writes where a fault-injection test can stop the process for real.

With SEMALIGN_PAUSE_AT=<name>, the process writes SEMALIGN_PAUSE_MARK (a file path) when it reaches <name>
and waits there until the mark file is deleted (the test then lets it go on) or SEMALIGN_PAUSE_S passes, so
a test can SIGKILL it at exactly that point or break a service under it. Unset (always, outside tests), this
is one environment lookup."""
import os
import time
from pathlib import Path


def checkpoint(name: str) -> None:
    if os.environ.get("SEMALIGN_PAUSE_AT") != name:
        return
    mark = os.environ.get("SEMALIGN_PAUSE_MARK")
    deadline = time.time() + float(os.environ.get("SEMALIGN_PAUSE_S", "600"))
    if not mark:
        time.sleep(max(0.0, deadline - time.time()))
        return
    Path(mark).write_text(f"{name} {os.getpid()}\n")
    while Path(mark).exists() and time.time() < deadline:
        time.sleep(0.1)
