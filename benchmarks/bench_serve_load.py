"""Load test of `itmatch serve`: starts the server, drives it with concurrent clients, stops it.

    /work/bin/heavy python benchmarks/bench_serve_load.py INDEX [--clients 50] [--seconds 30]

The server runs as its own process (`python -m itmatch.cli serve INDEX`) on a free loopback port.
Each client is a coroutine on one shared httpx.AsyncClient that sends POST /search/text (k=10, a
query drawn from the index's own captions) back to back, and one request in ten is a
GET /items/{id}/thumbnail of a result. Reported: requests/s, p50/p95/p99 latency, errors (any
status other than 200 or a transport error), and the server's resident memory (VmRSS) after a
warm-up and after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, queries: list[str], clients: int, seconds: float) -> tuple[list[float], int, int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    count = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(seed: int) -> None:
            nonlocal errors, count
            rng = random.Random(seed)
            last_image = None
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if last_image is not None and rng.random() < 0.1:
                        r = await client.get(f"/items/{last_image}/thumbnail")
                    else:
                        r = await client.post("/search/text", json={"text": rng.choice(queries), "k": 10})
                        if r.status_code == 200 and r.json()["results"]:
                            last_image = r.json()["results"][0]["id"]
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                count += 1
                errors += not ok

        await asyncio.gather(*(one(i) for i in range(clients)))
    return latencies, errors, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4, help="the server's inference threads")
    args = ap.parse_args()

    db = sqlite3.connect(Path(args.index) / "items.sqlite")
    queries = [r[0] for r in db.execute("SELECT caption FROM items WHERE side = 'caption' LIMIT 2000")]
    db.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen([sys.executable, "-c", "import sys; from itmatch.cli import main; sys.exit(main())",
                               "serve", args.index, "--port", str(port), "--workers", str(args.workers)], env=env)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        asyncio.run(drive(url, queries, args.clients, 3))  # warm-up: thread pool, caches, allocator
        before = rss_mib(server.pid)
        latencies, errors, count = asyncio.run(drive(url, queries, args.clients, args.seconds))
        after = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    lat = np.asarray(latencies) * 1000
    print(f"{args.clients} clients for {args.seconds:.0f}s against {args.index} ({args.workers} inference threads)")
    print(f"  requests {count}, errors {errors}, {count / args.seconds:.1f} requests/s")
    print(f"  latency p50 {np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms, "
          f"p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms")
    print(f"  server RSS {before:.0f} MiB after warm-up, {after:.0f} MiB after the run ({after - before:+.0f} MiB)")


if __name__ == "__main__":
    main()
