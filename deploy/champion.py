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


DEGRADED = "degraded:"   # how `error` begins while the holder serves without the registry
SERVED_RECORD = "served.json"   # under <home>/rankers: the champion this home last served, for a start without MLflow


class ServedChampion:
    """One champion: its scorer (pinned to its codebook version) and versions, swapped in as a unit. Its ranker
    folder is verified against the digests recorded when it was logged before anything is loaded from it."""

    def __init__(self, settings: Settings, folder, model_version: str, encoder_version: str | None):
        from semalign.deploy.scoring import RankerScorer

        self.folder = folder
        self.scorer = RankerScorer(folder, settings)
        self.model_version = str(model_version)
        self.codebook_version = self.scorer.codebook_version
        self.encoder_version = encoder_version
        self.loaded_at = time.time()

    @classmethod
    def from_registry(cls, settings: Settings, registry, mv) -> "ServedChampion":
        folder = registry.download_ranker(mv)   # verified against the digests recorded at logging
        served = cls(settings, folder, mv.version, mv.tags.get("encoder_version"))
        _write_record(settings, {"model": settings.model_name, "model_version": str(mv.version),
                                 "folder": folder.name, "encoder_version": mv.tags.get("encoder_version"),
                                 "digests": registry.recorded_digests(mv)})
        return served

    @classmethod
    def from_record(cls, settings: Settings) -> "ServedChampion | None":
        """The champion this home last served, verified against the digests recorded with it (None: no record)."""
        import json

        from semalign.deploy.registry import SAFE_KEY, verify_folder
        from semalign.errors import DamagedFileError

        path = settings.home / "rankers" / SERVED_RECORD
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
            folder_name, version = str(rec["folder"]), str(rec["model_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedFileError(path, f"{path}: not a record of a served champion ({e})") from e
        if rec.get("model") != settings.model_name:
            return None
        if not SAFE_KEY.fullmatch(folder_name) or folder_name in (".", ".."):
            raise DamagedFileError(path, f"{path}: names '{folder_name[:100]}', not a folder under {path.parent}")
        folder = path.parent / folder_name
        verify_folder(folder, rec.get("digests"), f"the champion v{version} this home last served")
        return cls(settings, folder, version, rec.get("encoder_version"))


def _write_record(settings: Settings, record: dict) -> None:
    import json

    from semalign import atomic

    try:
        atomic.write_text(settings.home / "rankers" / SERVED_RECORD, json.dumps(record, indent=1))
    except OSError:  # a read-only home: serving goes on, only a start without the registry cannot use it
        pass


class ChampionHolder:
    """Keeps the champion loaded. Starts without the registry where it must: when MLflow cannot be reached, the
    champion this home last served (verified against its recorded digests) is served and the holder reports itself
    degraded (`error`) until a check reaches the registry again."""

    def __init__(self, settings: Settings, check_interval_s: float = 30.0):
        self.settings, self.check_interval_s = settings, check_interval_s
        self._registry = None
        self.served: ServedChampion | None = None
        self.error: str | None = None
        self._checked_at = 0.0
        self._stop = threading.Event()

    @property
    def degraded(self) -> bool:
        """Serving without the registry: the champion this home last served, while MLflow cannot be reached."""
        return bool(self.error and self.error.startswith(DEGRADED))

    @property
    def registry(self):
        if self._registry is None:  # MLflow's client; an unreachable tracking server raises here
            from semalign.deploy.registry import Registry

            self._registry = Registry(self.settings)
        return self._registry

    def _load(self) -> ServedChampion:
        from semalign.deploy.registry import CHAMPION

        mv = self.registry.version_by_alias(CHAMPION)
        if mv is None:
            raise NoChampionError(f"model '{self.settings.model_name}' has no champion yet: run `semalign run` first")
        cur = self.served
        if cur is not None and cur.model_version == str(mv.version):
            return cur
        # one assignment: readers see the old champion or the new one
        self.served = ServedChampion.from_registry(self.settings, self.registry, mv)
        return self.served

    def check(self) -> None:
        """Loads the champion the alias names now; on failure keeps the loaded one and records why. With nothing
        loaded and the registry unreachable, the champion this home last served."""
        from semalign.deploy.registry import RegistryUnavailableError
        from semalign.errors import SemalignError

        self._checked_at = time.time()
        try:
            self._load()
            self.error = None
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            # the registry unreachable (MLflow's client raises its own errors while it is built): not a refusal
            unreachable = isinstance(e, RegistryUnavailableError) or not isinstance(e, SemalignError)
            if self.served is None and unreachable:
                try:
                    self.served = ServedChampion.from_record(self.settings)
                except Exception as e2:
                    self.error += f"; the champion this home last served was refused: {type(e2).__name__}: {e2}"
                    return
                if self.served is not None:
                    self.error = (f"{DEGRADED} the registry cannot be reached ({self.error}); serving champion "
                                  f"v{self.served.model_version} as this home last served it, until a check reaches "
                                  "the registry")

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
