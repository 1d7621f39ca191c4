"""Serving stands alone (issue 31, item 3): deploy/ reaches the store factory and the item embedder without
importing flows/, and a logged ranker carries only the modules its scoring imports."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _semalign_imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
    return {m for m in out if m.startswith("semalign.")}


def test_no_deploy_or_feature_repo_module_imports_flows_or_the_cli():
    for folder in ("deploy", "feature_repo"):
        for path in sorted((ROOT / folder).glob("*.py")):
            bad = [m for m in _semalign_imports(path) if m.startswith(("semalign.flows", "semalign.cli"))]
            assert not bad, f"{folder}/{path.name} imports {bad}"


def test_importing_serving_loads_no_flows_module():
    code = ("import sys, json; import semalign.deploy.scoring, semalign.deploy.champion, semalign.deploy.serve, "
            "semalign.deploy.ranker_model, semalign.feature_repo.store, semalign.feature_repo.embedder; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('semalign.flows', 'semalign.cli')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_logged_code_is_what_scoring_imports_and_imports_on_its_own(tmp_path):
    from semalign.deploy.registry import package_code, scoring_modules

    mods = scoring_modules()
    assert "semalign.deploy.scoring" in mods and "semalign.feature_repo.embedder" in mods
    assert "semalign.feature_repo.store" in mods and "semalign.models.ranker" in mods
    assert not [m for m in mods if m.startswith(("semalign.flows", "semalign.cli", "semalign.validation"))]
    assert not [m for m in mods if m.startswith("semalign.deploy.") and m != "semalign.deploy.scoring"]

    root = package_code(tmp_path / "code")
    shipped = sorted(str(p.relative_to(root.parent)) for p in root.rglob("*") if p.is_file())
    assert not [p for p in shipped if p.startswith(("semalign/flows", "semalign/cli", "semalign/validation"))]
    # the files the store reads beside its modules travel too
    for f in ("feature_store.yaml", ".feastignore", "definitions.py"):
        assert f"semalign/feature_repo/{f}" in shipped
    # with only the shipped copy on the path (the editable install's finder removed), every module imports from it
    code = """if True:
        import importlib, json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
        sys.path.insert(0, sys.argv[1])
        files = []
        for name in json.loads(sys.argv[2]):
            try:
                files.append(importlib.import_module(name).__file__)
            except ModuleNotFoundError as e:  # an optional third-party package (triton: CUDA builds only)
                if (e.name or '').startswith('semalign'):
                    raise
        print(json.dumps({'outside': [f for f in files if not f.startswith(sys.argv[1])],
                          'flows': sorted(m for m in sys.modules if m.startswith(('semalign.flows', 'semalign.cli')))}))
    """
    out = subprocess.run([sys.executable, "-c", code, str(root.parent), json.dumps(list(mods))],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"outside": [], "flows": []}
