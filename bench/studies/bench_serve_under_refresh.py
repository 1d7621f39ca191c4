"""Benchmark: `semalign serve` under a bounded concurrent loopback load, alone (the reference) and while a
refresh of the same deployment runs and promotes a new champion, then alone again. Same server, same
clients, same requests in every phase, so the ratios of the refresh phase's p50/p99 to the reference's say
what a refresh costs serving; every non-200 answer is counted as an error.

The deployment is built here from MovieLens-100K: a shop of --items items (string ids, as
tests/conftest.write_generic does), a first `semalign run`, then a second run on the same shop with 3% of the
labels flipped (a legitimate change: every stage retrains, a new codebook version is published).

  python bench/studies/bench_serve_under_refresh.py [--data ../shared/data/movielens-100k] [--items 300]
      [--clients 4] [--seconds 20]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results"


def pct(lat):
    a = np.asarray(lat) * 1000
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))} if len(a) \
        else {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}


def make_shop(movielens: Path, folder: Path, n_items: int, flip: float = 0.0, seed: int = 0) -> Path:
    import pandas as pd

    from semalign.data import load_dataset

    ds = load_dataset(movielens)
    items = ds.items.iloc[:n_items]
    inter = ds.interactions[ds.interactions["item_id"].isin(set(items["item_id"]))].reset_index(drop=True)
    label = inter["label"].to_numpy().copy()
    if flip:
        idx = np.random.default_rng(seed).choice(len(label), int(flip * len(label)), replace=False)
        label[idx] = 1 - label[idx]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": "sku-" + items["item_id"], "text": items["text"]}).to_csv(folder / "items.csv", index=False)
    pd.DataFrame({"user_id": "u" + inter["user_id"], "item_id": "sku-" + inter["item_id"],
                  "timestamp": inter["ts"], "label": label}).to_csv(folder / "interactions.csv", index=False)
    return folder


class Phase:
    def __init__(self, port: int, bodies: list[bytes], clients: int):
        self.port, self.bodies, self.clients = port, bodies, clients
        self.lat, self.status, self.versions = [], [], set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = []

    def _worker(self, wid: int):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        i = wid
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                conn.request("POST", "/score", body=self.bodies[i % len(self.bodies)],
                             headers={"content-type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                st = r.status
                version = json.loads(data)["model_version"] if st == 200 else None
            except OSError:
                st, version = 0, None
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            with self._lock:
                self.lat.append(time.perf_counter() - t)
                self.status.append(st)
                self.versions.add(version)
            i += self.clients

    def start(self):
        self.t0 = time.perf_counter()
        self.threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(self.clients)]
        for th in self.threads:
            th.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        for th in self.threads:
            th.join(70)
        wall = time.perf_counter() - self.t0
        errors = sum(s != 200 for s in self.status)
        return {**pct(self.lat), "seconds": wall, "rps": len(self.lat) / wall, "errors": errors,
                "model_versions": sorted(v for v in self.versions if v)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "movielens-100k")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="semalign-bench-refresh-"))
    shop = make_shop(args.data, work / "shop", args.items)
    changed = make_shop(args.data, work / "changed", args.items, flip=0.03, seed=1)
    env = {**os.environ, "SEMALIGN_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1",
           # the bench measures serving, not the gates: a changed shop must be promoted
           "SEMALIGN_GATE_AUC_TOLERANCE": "1", "SEMALIGN_GATE_COLD_AUC_TOLERANCE": "1",
           "SEMALIGN_GATE_MAX_LEVEL0_CHURN": "1", "SEMALIGN_DRIFT_SID_KL": "100"}
    first = subprocess.run([sys.executable, "-m", "semalign.cli", "run", "--data", str(shop), "--json"], env=env,
                           capture_output=True, text=True)
    if first.returncode:
        raise SystemExit(first.stderr[-3000:])
    import pandas as pd

    items = pd.read_csv(shop / "items.csv")["item_id"].tolist()
    users = pd.read_csv(shop / "interactions.csv")["user_id"].drop_duplicates().head(50).tolist()
    rng = np.random.default_rng(0)
    bodies = [json.dumps({"user_id": u, "candidates": [{"item_id": i} for i in rng.choice(items, 100, replace=False)]}
                         ).encode() for u in users]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port),
                               "--check-interval", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    phases = {}
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        warm = Phase(port, bodies, 1).start()
        time.sleep(2)
        warm.stop()

        ph = Phase(port, bodies, args.clients).start()
        time.sleep(args.seconds)
        phases["alone (reference)"] = ph.stop()

        ph = Phase(port, bodies, args.clients).start()
        t = time.perf_counter()
        refresh = subprocess.run([sys.executable, "-m", "semalign.cli", "run", "--data", str(changed), "--json"],
                                 env=env, capture_output=True, text=True)
        refresh_s = time.perf_counter() - t
        phases["during a refresh"] = ph.stop()
        if refresh.returncode:
            raise SystemExit(refresh.stderr[-3000:])
        promoted = json.loads(refresh.stdout)
        time.sleep(3)   # the server polls the alias every second

        ph = Phase(port, bodies, args.clients).start()
        time.sleep(args.seconds)
        phases["after the swap"] = ph.stop()
    finally:
        server.terminate()
        server.wait(20)
        log.close()
    ref = phases["alone (reference)"]
    for p in phases.values():
        p["p50_ratio"] = p["p50_ms"] / ref["p50_ms"]
        p["p99_ratio"] = p["p99_ms"] / ref["p99_ms"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    given = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("SEMALIGN_"))
    cmd = (given + " " if given else "") + "python bench/studies/bench_serve_under_refresh.py " + " ".join(sys.argv[1:])
    res = {"machine": machine, "command": cmd, "items": args.items, "clients": args.clients,
           "refresh_s": refresh_s, "refresh_promoted": promoted.get("promoted"),
           "champion_before": json.loads(first.stdout).get("champion"), "champion_after": promoted.get("champion"),
           "phases": phases}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_under_refresh_cpu.json").write_text(json.dumps(res, indent=2))
    md = ["# Scoring API under load while a refresh runs", "",
          f"Machine: {machine}. Command: `{cmd}`. Shop: {args.items} MovieLens items (sqlite online store), "
          f"{args.clients} concurrent loopback clients, 1 user x 100 candidates per request, one uvicorn worker. "
          f"The refresh (3% of labels flipped: retrains encoder, codebook, ranker; publishes a new codebook "
          f"version) took {refresh_s:.0f} s on the same 2 cores and "
          f"{'promoted v' + str(res['champion_after']) if res['refresh_promoted'] else 'did not promote'}.", "",
          "| phase | requests | errors | req/s | p50 ms | p99 ms | p50 / reference | p99 / reference | model versions served |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, p in phases.items():
        md.append(f"| {name} | {p['n']} | {p['errors']} | {p['rps']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                  f"{p['p50_ratio']:.2f}x | {p['p99_ratio']:.2f}x | {', '.join(p['model_versions'])} |")
    (OUT / "serve_under_refresh_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
