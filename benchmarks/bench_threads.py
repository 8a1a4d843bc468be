"""Two trainings at once on one machine: torch threads per process vs throughput.

Both `itmatch train` processes of an arm are pinned to the same `--cpus C` CPUs (the affinity a
container or `taskset` would give) and start together (vse_scenes, the same budget). Reported: the
training samples/s of each (mean over its logged windows after the first) and the wall time until
both are done. Arms alternate in rounds:

    oversubscribed  --threads 4C: what torch's own default does where a cgroup quota or an affinity
                    mask leaves fewer CPUs than the machine has (torch counts the machine's cores)
    auto            no --threads: itmatch counts the CPUs available to the process (C)
    shared          --threads C/2 (C >= 2): each of the two runs given its share

On the shared 2-core box, in one /work/bin/heavy slot (C = 1: both runs share one CPU):

    /work/bin/heavy python benchmarks/bench_threads.py --data /work/data/scenes-small --cpus 1 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from itmatch.threads import available_cpus  # noqa: E402


def run_pair(data: str, steps: int, threads: int | None, cpus: set[int], tmp: Path,
             tag: str) -> tuple[list[float], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    procs, runs = [], []
    t0 = time.perf_counter()
    for i in range(2):
        run = tmp / f"{tag}-{i}"
        runs.append(run)
        cmd = [sys.executable, "-m", "itmatch", "train", "--config", "vse_scenes", "--out", str(run),
               *(["--threads", str(threads)] if threads else []), "--set", f"data.root={data}",
               "--set", f"train.max_steps={steps}",
               "--set", "train.log_every_steps=5", "--set", "data.max_dev_images=100", "--set", f"train.seed={i}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                      preexec_fn=lambda: os.sched_setaffinity(0, cpus)))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err.decode()[-2000:])
    wall = time.perf_counter() - t0
    rates = []
    for run in runs:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r["samples_per_s"] for r in recs if r["kind"] == "train"][1:]
        rates.append(sum(train) / max(1, len(train)))
    return rates, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs both runs are pinned to (default: all available)")
    args = ap.parse_args()
    n = args.cpus or available_cpus()
    pinned = set(sorted(os.sched_getaffinity(0))[:n])
    arms: dict[str, int | None] = {"oversubscribed": 4 * n, "auto": None}
    if n >= 2:
        arms["shared"] = n // 2
    print(f"both runs pinned to CPUs {sorted(pinned)}; --threads per process: {arms} (None: itmatch's default, {n})")
    results: dict[str, list] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in names:
                rates, wall = run_pair(args.data, args.steps, arms[name], pinned, Path(tmp), f"{name}-{r}")
                results[name].append((sum(rates), wall))
                print(f"round {r + 1}: {name:15s} threads {arms[name] or n}: samples/s {rates[0]:.0f} + {rates[1]:.0f}"
                      f" = {sum(rates):.0f}, both done in {wall:.1f} s", flush=True)
    print("\nmean over rounds (two concurrent trainings):")
    ref = "shared" if "shared" in arms else "auto"
    base = sum(v[0] for v in results[ref]) / len(results[ref])
    for name, vals in results.items():
        rate = sum(v[0] for v in vals) / len(vals)
        wall = sum(v[1] for v in vals) / len(vals)
        print(f"  {name:15s} threads {arms[name] or n}: {rate:6.0f} samples/s total, {wall:6.1f} s wall, "
              f"throughput vs {ref} {rate / base:.2f}x")


if __name__ == "__main__":
    main()
