"""Reading interactions from S3 daily parquet partitions: semalign's source reader against pyarrow's own dataset
read of the same objects, in one process, on an S3-compatible server (moto_server) on loopback.

Writes a synthetic catalogue (`semalign.synth`), uploads its events as `interactions/dt=YYYY-MM-DD/part-0.parquet`,
then alternates the readers `--repeat` times in this process: time (best of the repeats). Peak memory: each reader
once more in a fresh child process (same code, same objects), its peak resident size (VmHWM) above its resident
size just before the read; in one long-lived process freed pages are reused, so deltas there understate whichever
reader runs later. Readers:
  - semalign: the loader's partition read (list, fetch, parse, concatenate: a pandas frame), as `semalign run` does
    before validation; also the whole `load_dataset` (validation, dense indices) for reference;
  - pyarrow: `pyarrow.dataset.dataset(..., partitioning="hive").to_table()` through `pyarrow.fs.S3FileSystem`, and the
    same followed by `.to_pandas()` (what semalign hands on is a pandas frame).

    python bench/bench_read.py --events 1000000
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

KEYS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    """This process's peak resident size so far, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measured(fn):
    """(seconds, result) of fn()."""
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def readers(uri: str, port: int, n_parts: int) -> dict:
    import pyarrow.dataset as pds
    import pyarrow.fs as pfs

    from semalign.data import _read_pieces, load_dataset
    from semalign.sources import open_source

    fs = pfs.S3FileSystem(access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                          endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    path = uri.removeprefix("s3://") + "/interactions"

    def semalign_read():
        frame, segments, bad, _, _ = _read_pieces(open_source(uri), "error")
        assert not bad and len(segments) == n_parts
        return len(frame)

    def arrow_table():
        return pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().num_rows

    def arrow_pandas():
        return len(pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas())

    def semalign_load():
        return len(load_dataset(uri).interactions)

    return {"pyarrow dataset to_table": arrow_table, "pyarrow dataset to_table + to_pandas": arrow_pandas,
            "semalign partition read": semalign_read, "semalign load_dataset (read + validate)": semalign_load}


def child(name: str, uri: str, port: int, n_parts: int) -> None:
    """One reader in this fresh process: prints its peak resident bytes above the start of the read."""
    import boto3  # noqa: F401  (imported before the baseline: module code is not what a read costs)
    import pyarrow.parquet  # noqa: F401

    fn = readers(uri, port, n_parts)[name]
    gc.collect()
    base = rss()
    fn()
    print(hwm() - base)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tag", default="read_s3_partitions_cpu")
    ap.add_argument("--child", nargs=4, metavar=("READER", "URI", "PORT", "PARTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))

    import boto3
    import pandas as pd

    from semalign.synth import SynthConfig, generate

    port = 40000 + os.getpid() % 20000
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **KEYS})
    os.environ.update({**KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        for _ in range(100):
            try:
                client = boto3.client("s3")
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp) / "shop", SynthConfig(items=max(1000, args.events // 10), events=args.events, seed=0))
            events = pd.read_parquet(Path(tmp) / "shop" / "interactions.parquet")
            client.upload_file(str(Path(tmp) / "shop" / "items.parquet"), "bench", "shop/items.parquet")
        days = events["timestamp"].dt.strftime("%Y-%m-%d")
        nbytes = 0
        for day, part in events.groupby(days):
            buf = io.BytesIO()
            part.to_parquet(buf, index=False)
            nbytes += buf.tell()
            client.put_object(Bucket="bench", Key=f"shop/interactions/dt={day}/part-0.parquet", Body=buf.getvalue())
        n_parts = days.nunique()
        del events, days
        uri = "s3://bench/shop"
        fns = readers(uri, port, n_parts)
        runs = {k: [] for k in fns}
        for _ in range(args.repeat):
            for name, fn in fns.items():
                took, rows = measured(fn)
                assert rows == args.events, (name, rows)
                runs[name].append(took)
        peaks = {name: int(subprocess.run([sys.executable, __file__, "--child", name, uri, str(port), str(n_parts)],
                                          capture_output=True, text=True, check=True).stdout.split()[-1])
                 for name in fns}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)

    res = {name: {"best_s": min(r), "peak_mb": peaks[name] / 2**20, "times_s": r} for name, r in runs.items()}
    ref, ref_pd = res["pyarrow dataset to_table"], res["pyarrow dataset to_table + to_pandas"]
    mine = res["semalign partition read"]
    ratios = {"time_vs_to_table": mine["best_s"] / ref["best_s"], "time_vs_to_pandas": mine["best_s"] / ref_pd["best_s"],
              "memory_vs_to_table": mine["peak_mb"] / max(ref["peak_mb"], 1e-9),
              "memory_vs_to_pandas": mine["peak_mb"] / max(ref_pd["peak_mb"], 1e-9)}
    md = [f"{args.events:,} events in {n_parts} daily partitions ({nbytes / 2**20:.1f} MB of parquet) on moto_server "
          f"(127.0.0.1); time: best of {args.repeat} alternating reads in one process; peak: the read alone in a fresh "
          "process, its peak resident size above its size before the read.", "", "| reader | best s | peak MB |", "|---|---|---|"]
    md += [f"| {name} | {r['best_s']:.2f} | {r['peak_mb']:.0f} |" for name, r in res.items()]
    md += ["", f"semalign's read vs pyarrow's to_table: {ratios['time_vs_to_table']:.2f}x time, "
               f"{ratios['memory_vs_to_table']:.2f}x peak memory; vs to_table + to_pandas (the same output, a pandas "
               f"frame): {ratios['time_vs_to_pandas']:.2f}x time, {ratios['memory_vs_to_pandas']:.2f}x peak memory."]
    harness.write(args.tag, {"events": args.events, "partitions": int(n_parts), "parquet_bytes": nbytes,
                             "readers": res, "ratios": ratios}, md,
                  "Reading interactions from S3 daily partitions: semalign vs pyarrow's dataset read")


if __name__ == "__main__":
    main()
