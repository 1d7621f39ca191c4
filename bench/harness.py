"""What every benchmark shares: the machine it ran on, timing, and its results as JSON + markdown.

Benchmarks run as `python bench/NAME.py ...` from the repository root. Python puts the script's folder first on
sys.path, so `import harness` needs nothing else, and the product is the installed `semalign` package (`make
install` here; on the GPU machine the wheel `../shared/tools/device-pack` builds, on PYTHONPATH)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """One line: architecture, cores, Python, torch and the GPUs when torch is loaded, the 1-minute load average."""
    parts = [platform.machine(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            parts.append(f"{len(names)} x {names[0]}" if len(set(names)) == 1 else " + ".join(names))
    return ", ".join(parts + [f"load {os.getloadavg()[0]:.1f}"])


def command() -> str:
    """The exact command line, as run from the repository root; BENCH_COMMAND_PREFIX (a wrapper script's own
    command) goes in front."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    prefix = os.environ.get("BENCH_COMMAND_PREFIX", "")
    return " ".join(filter(None, [prefix, "python", str(name), *sys.argv[1:]]))


def percentiles(seconds) -> dict:
    """p50 / p99 in milliseconds of durations in seconds, and how many (None when there are none)."""
    import numpy as np

    ms = np.asarray(seconds, dtype=float) * 1000
    if not len(ms):
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timings(fn, reps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `reps` calls of fn, after `warmup` untimed calls (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return out


def best_of(fn, repeat: int = 1) -> tuple[float, object]:
    """(fastest of `repeat` calls in seconds, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def write(tag: str, result: dict, markdown: str | list[str], title: str, out: Path | str = RESULTS) -> dict:
    """OUT/TAG.json (the result with the machine and the command, unless it names its own) and OUT/TAG.md (title,
    machine, command, then the tables); prints the markdown. Returns the JSON's content."""
    result = {"tag": tag, "machine": machine(), "command": command(), **result}
    body = markdown if isinstance(markdown, str) else "\n".join(markdown)
    text = f"# {title}\n\nMachine: {result['machine']}. Command: `{result['command']}`.\n\n{body.strip()}\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / f"{tag}.md").write_text(text)
    print(text, flush=True)
    return result
