"""Adds Ray to what `../shared/tools/device-pack` put in .device/, for the scaling bench on the GPU machine.

The GPU image has no Ray, and Ray's wheel (79 MB) is over a device call's 64 MiB carry. Its Java jars and RLlib
(no semalign stage uses either) are dropped from a copy of the wheel, which leaves ~45 MB; the few packages Ray
needs that the image lacks travel beside it. Run from the project root after device-pack:

    python bench/device_ray_pack.py            # -> .device/whl/ray-*.whl (+ jsonschema & co.)
then a device run with carry [".device"] and `bash bench/device_scaling.sh ...` (its docstring says what it runs).
"""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

DROP = ("ray/jars/", "ray/rllib/", "ray/llm/")
# Ray's own needs (and Ray Train's) that the GPU image does not hold (the image's package list: device KINDS.md)
NEEDS = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download(names: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + names, check=True)


def strip_wheel(src: Path, dest: Path) -> Path:
    """A copy of the wheel without DROP, its RECORD rewritten to match."""
    out = dest / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in zin.infolist():
            if info.filename.startswith(DROP) or info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(rows) + "\n")
    return out


def main() -> None:
    whl = Path(".device/whl")
    if not whl.is_dir():
        sys.exit("run ../shared/tools/device-pack first (.device/whl is missing)")
    pins = {n: metadata.version(n) for n in ("ray", *NEEDS)}
    with tempfile.TemporaryDirectory() as tmp:
        download([f"ray=={pins['ray']}"], Path(tmp))
        src = next(Path(tmp).glob("ray-*.whl"))
        out = strip_wheel(src, whl)
        print(f"{out.name}: {src.stat().st_size / 2**20:.1f} MiB -> {out.stat().st_size / 2**20:.1f} MiB")
    download([f"{n}=={v}" for n, v in pins.items() if n != "ray"], whl)
    total = sum(f.stat().st_size for f in Path(".device").rglob("*") if f.is_file())
    print(f".device: {total / 2**20:.1f} MiB (a call carries at most 64 MiB)")


if __name__ == "__main__":
    main()
