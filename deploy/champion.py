"""The champion holder: the loaded champion ranker (pinned to its codebook version) and the poll that swaps in a
new champion whole when the registry's alias moves, so a ranker is never paired with another codebook version's
features. A failed check keeps serving the loaded champion and is reported in /health."""
from __future__ import annotations

import threading
import time

from semalign.config import Settings
from semalign.errors import UnavailableError


class NoChampionError(UnavailableError):
    """No champion is loaded (none registered yet, or the registry was unreachable at start)."""


class ServedChampion:
    """One champion: its scorer (pinned to its codebook version) and versions, swapped in as a unit."""

    def __init__(self, settings: Settings, registry, mv):
        from semalign.deploy.scoring import RankerScorer

        key = mv.tags.get("input_key") or f"v{mv.version}"
        folder = registry.download_ranker(mv, settings.home / "rankers" / key)
        self.scorer = RankerScorer(folder, settings)
        self.model_version = str(mv.version)
        self.codebook_version = self.scorer.codebook_version
        self.encoder_version = mv.tags.get("encoder_version")
        self.loaded_at = time.time()


class ChampionHolder:
    def __init__(self, settings: Settings, check_interval_s: float = 30.0):
        from semalign.deploy.registry import Registry

        self.settings, self.check_interval_s = settings, check_interval_s
        self.registry = Registry(settings)
        self.served: ServedChampion | None = None
        self.error: str | None = None
        self._checked_at = 0.0
        self._stop = threading.Event()

    def _load(self) -> ServedChampion:
        from semalign.deploy.registry import CHAMPION

        mv = self.registry.version_by_alias(CHAMPION)
        if mv is None:
            raise NoChampionError(f"model '{self.settings.model_name}' has no champion yet: run `semalign run` first")
        cur = self.served
        if cur is not None and cur.model_version == str(mv.version):
            return cur
        self.served = ServedChampion(self.settings, self.registry, mv)  # one assignment: readers see old or new
        return self.served

    def check(self) -> None:
        """Loads the champion the alias names now; on failure keeps the loaded one and records why."""
        self._checked_at = time.time()
        try:
            self._load()
            self.error = None
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def current(self) -> ServedChampion:
        """The champion to score with (re-checked when the interval has passed); NoChampionError if none."""
        if self.served is None or time.time() - self._checked_at > self.check_interval_s:
            self.check()
        if self.served is None:
            raise NoChampionError(f"no model loaded: {self.error}")
        return self.served

    def start(self) -> None:
        """The first load and a daemon thread that re-checks every interval until `stop`."""
        self.check()

        def poll():
            while not self._stop.wait(self.check_interval_s):
                self.check()

        threading.Thread(target=poll, daemon=True, name="champion-poll").start()

    def stop(self) -> None:
        self._stop.set()
