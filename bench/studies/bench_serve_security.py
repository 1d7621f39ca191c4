"""Benchmark: what authentication costs and what one request can force under the caps, on a real `semalign serve`.

Two servers on the same home, one with API keys and one without, answer the same `POST /score` (1 user x 100
stored candidates) in alternation: p50/p99 and the auth-on / auth-off ratio (the reference is the open server in
the same run). Then the most CPU one authenticated request can force: `SEMALIGN_SERVE_MAX_NEW_ITEMS` new items
with texts of the longest accepted length (encoded on the fly), measured as the server process's CPU time
(/proc), and how fast the refusals come: 10 MB declared, 1,000 x 19,000-character texts declared, and the same
sent in full. Needs a home with a champion (`semalign run`).

  python bench/studies/bench_serve_security.py --home /tmp/mlbench [--requests 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results"
TOKEN = "bench-" + "t" * 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """utime + stime of a process and its children so far (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


def request(port: int, body: bytes, token: str | None, declared_only: bool = False):
    """(status, seconds) of one POST /score on a fresh connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    head = (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n").encode()
    t0 = time.perf_counter()
    try:
        sock.sendall(head if declared_only else head + body)
    except OSError:
        pass
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    elapsed = time.perf_counter() - t0
    sock.close()
    return int(reply.split(b" ", 2)[1]), elapsed


def start(home: Path, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port)],
                            env={**os.environ, "SEMALIGN_HOME": str(home), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if b" 200 " in sock.recv(1024):
                sock.close()
                return proc
            sock.close()
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not become healthy")


def pct(ts) -> dict:
    a = np.asarray(ts) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    from semalign.config import Settings
    from semalign.data import MAX_REQUEST_TEXT_CHARS
    from semalign.deploy.registry import CHAMPION, Registry
    from semalign.deploy.scoring import RankerScorer

    s = Settings(home=args.home)
    reg = Registry(s)
    mv = reg.version_by_alias(CHAMPION)
    scorer = RankerScorer(reg.download_ranker(mv, s.home / "rankers" / (mv.tags.get("input_key") or f"v{mv.version}")), s)
    found = scorer.item_features(list(scorer.id_row)[:400])   # items the champion trained on
    items = [i for i, (_, f, _, _) in found.items() if f][:100]
    ids = [p + str(k) for p in ("", "u") for k in range(1, 1000)]   # MovieLens ids, or the test shops' "u<k>"
    user = next(u for u, r in zip(ids, scorer.store.users_online(ids, scorer.users_version)) if r)
    body = json.dumps({"user_id": user, "candidates": [{"item_id": i} for i in items]}).encode()
    keys = args.home / "bench-keys"
    keys.write_text(f"bench {TOKEN} score,write\n")
    limits = {"SEMALIGN_SERVE_RATE_LIMIT": "1000000/minute"}
    p_on, p_off = free_port(), free_port()
    on = start(args.home, p_on, {**limits, "SEMALIGN_SERVE_API_KEYS_FILE": str(keys)})
    off = start(args.home, p_off, limits)
    try:
        for _ in range(10):  # warm both
            request(p_on, body, TOKEN), request(p_off, body, None)
        t_on, t_off = [], []
        for _ in range(args.requests):
            st, t = request(p_on, body, TOKEN)
            assert st == 200, st
            t_on.append(t)
            st, t = request(p_off, body, None)
            assert st == 200, st
            t_off.append(t)
        n_new = s.serve_max_new_items
        worst = json.dumps({"user_id": user, "candidates": [
            {"item_id": f"bench-new-{k}-{time.time_ns()}", "text": ("word " * (MAX_REQUEST_TEXT_CHARS // 5))[:MAX_REQUEST_TEXT_CHARS]}
            for k in range(n_new)]}).encode()
        worst_cpu, worst_wall = [], []
        for _ in range(5):
            c0 = cpu_s(on.pid)
            st, t = request(p_on, worst, TOKEN)
            assert st == 200, st
            worst_cpu.append(cpu_s(on.pid) - c0)
            worst_wall.append(t)
        big = json.dumps({"user_id": user, "candidates": [{"item_id": f"n{k}", "text": "t" * 19_000}
                                                          for k in range(1000)]}).encode()
        refusals = {
            "10 MB declared": request(p_on, b"{" * 10_000_000, TOKEN, declared_only=True),
            "1,000 x 19,000-char texts declared (19 MB)": request(p_on, big, TOKEN, declared_only=True),
            "1,000 x 19,000-char texts sent in full": request(p_on, big, TOKEN),
        }
    finally:
        on.terminate(), off.terminate()
        on.wait(20), off.wait(20)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": "python bench/studies/bench_serve_security.py " + " ".join(sys.argv[1:]),
        "score_auth_on": pct(t_on), "score_auth_off": pct(t_off),
        "auth_on_over_off_p50": pct(t_on)["p50_ms"] / pct(t_off)["p50_ms"],
        "auth_on_over_off_p99": pct(t_on)["p99_ms"] / pct(t_off)["p99_ms"],
        "worst_request": {"new_items": n_new, "text_chars": MAX_REQUEST_TEXT_CHARS,
                          "cpu_ms": [round(c * 1000, 1) for c in worst_cpu],
                          "wall_ms": [round(w * 1000, 1) for w in worst_wall]},
        "refusals": {k: {"status": st, "ms": round(t * 1000, 2)} for k, (st, t) in refusals.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_security_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Scoring API: authentication cost and the most one request can force", "",
          f"Machine: {res['machine']}. Command: `{res['command']}`. One uvicorn worker per server, loopback, "
          "a fresh connection per request.", "",
          "| what | p50 ms | p99 ms | n |", "|---|---|---|---|",
          f"| `POST /score` 1 x 100, auth off (reference) | {res['score_auth_off']['p50_ms']:.2f} | "
          f"{res['score_auth_off']['p99_ms']:.2f} | {res['score_auth_off']['n']} |",
          f"| the same, Bearer key + scope + rate limit | {res['score_auth_on']['p50_ms']:.2f} | "
          f"{res['score_auth_on']['p99_ms']:.2f} | {res['score_auth_on']['n']} |", "",
          f"Auth on / off: p50 {res['auth_on_over_off_p50']:.2f}x, p99 {res['auth_on_over_off_p99']:.2f}x.", "",
          f"Most CPU one request can force under the caps ({n_new} new items x {MAX_REQUEST_TEXT_CHARS:,}-character "
          f"texts, encoded on the fly): server CPU {np.median(worst_cpu) * 1000:.0f} ms (median of 5; "
          f"{', '.join(str(c) for c in res['worst_request']['cpu_ms'])}), wall "
          f"{np.median(worst_wall) * 1000:.0f} ms.", "", "| refused request | status | ms to the answer |",
          "|---|---|---|"] + [f"| {k} | {v['status']} | {v['ms']:.2f} |" for k, v in res["refusals"].items()]
    (OUT / "serve_security_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
