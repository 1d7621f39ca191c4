"""Atomic writes: a file or a folder is built under a temporary sibling name, then renamed into place, so a
reader (or a run killed half way) never sees it half written. One naming scheme, `.<name>.tmp-<pid>`, which
`semalign.flows.refresh.remove_dead_temporaries` recognises and clears once its process is gone.

(`models/` keeps its own two-line version: it imports only torch, numpy and transformers.)"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_sibling(path: Path) -> Path:
    """The temporary name `path` is built under by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@contextmanager
def building(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary folder beside `dest`; when the block ends without an error it becomes `dest` in
    one rename. An existing `dest` is replaced (`replace=True`) or kept, the new build dropped (`replace=False`,
    for content-addressed folders whose existing copy is identical). On an error the temporary folder is removed."""
    dest = Path(dest)
    tmp = temp_sibling(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        if not replace:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(dest)  # a partial folder from an older layout, or a concurrent identical build
    os.replace(tmp, dest)
