"""Benchmark: scoring latency of `semalign serve` for 1 user x 100 candidates, and requests/s under a bounded
concurrent loopback load.

Reference in the same process: the same scoring done in-process (`RankerScorer.score`, features from the same
Feast online store, no HTTP), i.e. what the server adds on top of the model + feature reads. Concurrency: the same
in-process scoring from `--concurrency` threads, lock-free (each request hands its item rows to the forward) against
the same threads serialised by one lock (what the scorer did before: swap the model's buffers under a lock).
Needs a home with a champion (`semalign run`).

  python bench/bench_serve.py [--home ~/.semalign] [--requests 200] [--concurrency 8] [--seconds 15] [--tag serve_cpu]

The serving profile is the settings' (SEMALIGN_SERVING_PROFILE, as the server started here reads it).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from harness import percentiles as pct
from harness import timings, write


def post(conn, body: bytes):
    conn.request("POST", "/score", body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("SEMALIGN_HOME", Path.home() / ".semalign")))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--tag", default="serve_cpu", help="results name (one per serving profile)")
    args = ap.parse_args()

    from semalign.config import Settings
    from semalign.deploy.registry import CHAMPION, Registry
    from semalign.deploy.scoring import RankerScorer

    s = Settings(home=args.home)
    reg = Registry(s)
    mv = reg.version_by_alias(CHAMPION)
    if mv is None:
        raise SystemExit(f"no champion under {args.home}: run `semalign run` first")
    folder = reg.download_ranker(mv, s.home / "rankers" / (mv.tags.get("input_key") or f"v{mv.version}"))
    scorer = RankerScorer(folder, s)
    users = [u for u, r in zip(map(str, range(1, 400)), scorer.store.users_online([str(u) for u in range(1, 400)], scorer.users_version)) if r]
    rng = np.random.default_rng(0)
    vocab = json.loads((folder / "vocab.json").read_text())
    bodies, calls = [], []
    for k in range(50):
        user = users[k % len(users)]
        cands = [str(x) for x in rng.choice(vocab, 100, replace=False)]
        bodies.append(json.dumps({"user_id": user, "candidates": [{"item_id": c} for c in cands]}).encode())
        calls.append((user, cands))

    # reference: in-process scoring (feature reads + model), no HTTP
    for u, c in calls[:5]:
        scorer.score([u] * len(c), c)
    turn = iter(range(args.requests))

    def score_next():
        u, c = calls[next(turn) % len(calls)]
        scorer.score([u] * len(c), c)
    ref = timings(score_next, args.requests)

    def threaded(seconds: float, lock: threading.Lock | None) -> float:
        """Requests/s of in-process scoring from `concurrency` threads for `seconds`."""
        end, n = time.time() + seconds, [0]

        def work(wid):
            i = wid
            while time.time() < end:
                u, c = calls[i % len(calls)]
                if lock is None:
                    scorer.score([u] * len(c), c)
                else:
                    with lock:
                        scorer.score([u] * len(c), c)
                n[0] += 1
                i += args.concurrency

        ths = [threading.Thread(target=work, args=(w,)) for w in range(args.concurrency)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return n[0] / (time.perf_counter() - t0)

    rps_locked = threaded(args.seconds / 2, threading.Lock())
    rps_free = threaded(args.seconds / 2, None)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SEMALIGN_HOME": str(args.home)}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"semalign-bench-serve-{port}.log"
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
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
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for b in bodies[:5]:
            assert post(conn, b)[0] == 200
        seq, errors = [], 0
        for i in range(args.requests):
            t = time.perf_counter()
            st, _ = post(conn, bodies[i % len(bodies)])
            seq.append(time.perf_counter() - t)
            errors += st != 200

        lat, errs, done = [], [0], [0]
        stop = time.time() + args.seconds

        def worker(wid):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            i = wid
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    st, _ = post(c, bodies[i % len(bodies)])
                except OSError:
                    st = 0
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                lat.append(time.perf_counter() - t)
                errs[0] += st != 200
                done[0] += 1
                i += args.concurrency

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(20)
        log.close()
        print(f"server log: {log_path}", file=sys.stderr)
    res = {"serving_profile": s.serving_profile, "model_version": str(mv.version), "codebook_version": scorer.codebook_version,
           "in_process_reference": pct(ref), "http_sequential": pct(seq), "http_sequential_errors": errors,
           "http_over_in_process_p50": pct(seq)["p50_ms"] / pct(ref)["p50_ms"],
           "in_process_threads": {"concurrency": args.concurrency, "rps_one_lock": rps_locked, "rps_lock_free": rps_free,
                                  "lock_free_over_one_lock": rps_free / rps_locked},
           "load": {"concurrency": args.concurrency, "seconds": wall, "requests": done[0], "errors": errs[0],
                    "rps": done[0] / wall, **pct(lat)}}
    md = [f"Champion v{res['model_version']} "
          f"(codebook {res['codebook_version']}), {s.serving_profile} serving profile, {s.feast_online} online store, one uvicorn worker, loopback HTTP client.", "",
          "| what | p50 ms | p99 ms | n |", "|---|---|---|---|",
          f"| in-process scoring (reference: feature reads + model, no HTTP) | {res['in_process_reference']['p50_ms']:.2f} | "
          f"{res['in_process_reference']['p99_ms']:.2f} | {res['in_process_reference']['n']} |",
          f"| `POST /score`, sequential | {res['http_sequential']['p50_ms']:.2f} | {res['http_sequential']['p99_ms']:.2f} | "
          f"{res['http_sequential']['n']} |",
          f"| `POST /score`, {args.concurrency} concurrent clients for {wall:.0f} s | {res['load']['p50_ms']:.2f} | "
          f"{res['load']['p99_ms']:.2f} | {res['load']['requests']} |", "",
          f"HTTP / in-process p50: {res['http_over_in_process_p50']:.2f}x. Under load: {res['load']['rps']:.0f} "
          f"requests/s, {res['load']['errors']} errors; sequential errors: {errors}.", "",
          f"In-process, {args.concurrency} threads: {rps_free:.0f} requests/s lock-free (per-request item tables) vs "
          f"{rps_locked:.0f} serialised by one lock (the scorer before): {rps_free / rps_locked:.2f}x."]
    write(args.tag, res, md, "Scoring API: 1 user x 100 candidates")


if __name__ == "__main__":
    main()
