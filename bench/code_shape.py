"""The shape of the product code: the longest functions, the largest modules and the import graph between the
top-level folders, for a checkout or a git revision (issue: "a house people can live in"), and bench/'s share of
the lines (bench/ against the product folders plus bench/).

  python bench/code_shape.py [--rev REV ...] [--json bench/results/code_shape.json] [--edge deploy:flows ...]

Each --rev is read from git (`git archive`) into a temporary folder; without --rev the working tree is measured.
Writes JSON + a markdown table beside it."""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("semalign", "models", "flows", "feature_repo", "deploy", "validation")
NAME = {"semalign.models": "models", "semalign.flows": "flows", "semalign.feature_repo": "feature_repo",
        "semalign.deploy": "deploy", "semalign.validation": "validation"}


def _folder_of(module: str) -> str | None:
    for prefix, folder in NAME.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    if module == "semalign" or module.startswith("semalign."):
        return "semalign"
    return None


def measure(tree: Path) -> dict:
    funcs, modules, edges, by_module = [], [], {}, {}
    for folder in FOLDERS:
        for path in sorted((tree / folder).rglob("*.py")):
            rel = str(path.relative_to(tree))
            src = path.read_text()
            modules.append({"module": rel, "lines": len(src.splitlines())})
            node = ast.parse(src)
            for n in ast.walk(node):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs.append({"function": f"{rel}:{n.name}", "lines": n.end_lineno - n.lineno + 1})
                elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0 or isinstance(n, ast.Import):
                    for name in [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]:
                        dst = _folder_of(name)
                        if dst and dst != folder:
                            edges.setdefault(folder, set()).add(dst)
                            by_module.setdefault(f"{folder} -> {dst}", set()).add(rel)
    bench = [len(p.read_text().splitlines()) for p in sorted((tree / "bench").rglob("*.py"))]
    funcs.sort(key=lambda f: -f["lines"])
    modules.sort(key=lambda m: -m["lines"])
    return {"longest_functions": funcs[:10], "largest_modules": modules[:10],
            "functions_over_60_lines": [f for f in funcs if f["lines"] > 60],
            "modules": len(modules), "total_lines": sum(m["lines"] for m in modules),
            "bench_files": len(bench), "bench_lines": sum(bench),
            "bench_share": round(sum(bench) / max(1, sum(bench) + sum(m["lines"] for m in modules)), 3),
            "imports_between_folders": {k: sorted(v) for k, v in sorted(edges.items())},
            "modules_per_edge": {k: sorted(v) for k, v in sorted(by_module.items())}}


def at_rev(rev: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *FOLDERS, "bench"], capture_output=True,
                              check=True).stdout
        Path(tmp, "a.tar").write_bytes(data)
        with tarfile.open(Path(tmp, "a.tar")) as tf:
            tf.extractall(tmp, filter="data")
        return measure(Path(tmp))


def markdown(results: dict[str, dict]) -> str:
    out = []
    for label, r in results.items():
        out += [f"### {label}", "", f"{r['modules']} modules, {r['total_lines']} lines; "
                f"{len(r['functions_over_60_lines'])} functions over 60 lines; bench/: {r['bench_files']} Python files, "
                f"{r['bench_lines']} lines, {r['bench_share']:.0%} of product + bench lines", "",
                "| longest functions | lines | largest modules | lines |", "|---|---|---|---|"]
        for f, m in zip(r["longest_functions"], r["largest_modules"]):
            out.append(f"| `{f['function']}` | {f['lines']} | `{m['module']}` | {m['lines']} |")
        out += ["", "imports between folders: " + "; ".join(f"`{k}` -> {', '.join(v)}"
                                                         for k, v in r["imports_between_folders"].items()), ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", action="append", default=[], help="git revision (repeatable); default: the work tree")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--edge", action="append", default=[], metavar="SRC:DST",
                    help="also list the modules of folder SRC that import folder DST (repeatable), e.g. deploy:flows")
    args = ap.parse_args()
    results = {f"rev {r}": at_rev(r) for r in args.rev} if args.rev else {}
    results["work tree"] = measure(ROOT)
    text = markdown(results)
    for edge in args.edge:
        src, dst = edge.split(":", 1)
        for label, r in results.items():
            text += f"\n{label}: `{src}` -> {dst} in " + (", ".join(f"`{m}`" for m in r["modules_per_edge"].get(
                f"{src} -> {dst}", [])) or "no module") + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": "python bench/code_shape.py " + " ".join(
            f"--rev {r}" for r in args.rev), "results": results}, indent=2) + "\n")
        args.json.with_suffix(".md").write_text("# Code shape\n\nCommand: `python bench/code_shape.py "
                                                + " ".join(f"--rev {r}" for r in args.rev) + "`\n\n" + text)


if __name__ == "__main__":
    main()
