"""One refresh followed hop by hop: every call from one semalign module into another during `semalign run`
(in-process, a profiler on Python calls), counted once per (caller module, callee module) pair in the order first
taken; with the modules and top-level folders the refresh passes through.

    python bench/studies/refresh_hops.py --data D --home H [--out hops.json]

Runs one whole refresh (use a small catalogue and few epochs: the profiler slows Python calls). Measures the
installed `semalign` (PYTHONPATH decides which one), so two versions of the code are compared by running it twice."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("models", "flows", "feature_repo", "deploy", "validation") \
        else "semalign"


def trace_refresh(data: Path, home: Path) -> dict:
    import semalign

    root = str(Path(semalign.__file__).resolve().parent)
    from semalign.config import Settings
    from semalign.flows import prefect_env

    settings = Settings(home=home, data=str(data))
    prefect_env.prepare(settings)
    from semalign.flows.refresh import run_refresh

    edges: dict[tuple[str, str], int] = {}
    order: list[tuple[str, str]] = []
    modules: dict[str, None] = {}

    def module_of(frame) -> str | None:
        name = frame.f_globals.get("__name__", "")
        return name if name.startswith("semalign") and frame.f_code.co_filename.startswith(root) else None

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = module_of(frame)
        if callee is None:
            return
        modules.setdefault(callee)
        caller_frame = frame.f_back
        while caller_frame is not None and module_of(caller_frame) is None:
            caller_frame = caller_frame.f_back   # through library frames (Prefect's task engine) to our caller
        caller = module_of(caller_frame) if caller_frame is not None else None
        if caller and caller != callee:
            key = (caller, callee)
            if key not in edges:
                order.append(key)
            edges[key] = edges.get(key, 0) + 1

    import threading

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        summary = run_refresh(settings, data)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    folders = sorted({folder(m) for m in modules})
    crossings = [(a, b) for a, b in order if folder(a) != folder(b)]
    return {"champion": summary.get("champion"), "modules": len(modules), "hops": len(order),
            "folder_crossing_hops": len(crossings), "folders": folders,
            "folder_edges": sorted({f"{folder(a)} -> {folder(b)}" for a, b in order if folder(a) != folder(b)}),
            "path": [f"{a} -> {b}" for a, b in order]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = trace_refresh(args.data, args.home)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in res.items() if k != "path"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
