"""The shared benchmark harness: comparisons that hold on a loaded, shared machine.

Every benchmark in this folder goes through it:
  - `add_arguments` gives each script the same flags: `--threads` (torch/BLAS threads, default 1,
    because with other processes on the machine 2 threads ran up to 20x slower than 1), `--rounds`,
    `--repeats` and `--json` (append the records as JSON lines);
  - `compare` alternates the compared arms in rounds (rotating which arm goes first, so drift and
    a neighbour's burst of load hit every arm alike), repeats each arm within a round, and keeps one
    time per arm per round;
  - `Bench.report` prints min and median per arm and the ratios to the baseline arm (of the minima,
    of the medians, and the median of the per-round paired ratios), and records with every result
    the thread count, the load average before and after, and the torch / BLAS versions.

    from harness import Bench, add_arguments
    bench = Bench("what is measured", args)          # after parse_args: sets the threads
    times = bench.compare({"mean": f, "gpo": g}, rounds=args.rounds, repeats=args.repeats)
    bench.report(times, baseline="mean", unit="ms")
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def add_arguments(parser: argparse.ArgumentParser, rounds: int = 5, repeats: int = 3) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op (and BLAS) threads (default 1)")
    parser.add_argument("--rounds", type=int, default=rounds, help="rounds; every arm runs once per round")
    parser.add_argument("--repeats", type=int, default=repeats, help="calls of an arm per round (timed together)")
    parser.add_argument("--json", default=None, help="append every record to this file as a JSON line")
    return parser


def first_epoch_trainer(cfg, run_dir):
    """(trainer, loader): a fully set-up `Trainer` (`prepare()`, no training) and a DataLoader over its
    first epoch's batches, for benchmarks that probe single steps of a configured run."""
    from itmatch.training.loop import Trainer

    trainer = Trainer(cfg, run_dir, echo=False)
    trainer.prepare()
    trainer.sampler.set_epoch(0)
    trainer.dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_sampler=trainer.sampler,
                                         collate_fn=trainer.dataset.collate)
    return trainer, loader


def load_average() -> list[float]:
    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(x) for x in f.read().split()[:3]]


def blas_versions() -> dict[str, str]:
    """torch's BLAS (from its build configuration) and numpy's."""
    out = {}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "Math Kernel Library" in line or "OpenBLAS" in line or line.startswith("BLAS_INFO"):
            out["torch_blas"] = line.split(", ")[0][:120]
            break
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode; the version is then simply not recorded
        out["numpy_blas"] = "unknown"
    return out


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), **blas_versions(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.processor() or
            platform.machine()}


class Bench:
    """One benchmark run: sets the threads, then prints and records every comparison with its context."""

    def __init__(self, title: str, args: argparse.Namespace):
        self.title, self.args = title, args
        threads = getattr(args, "threads", 1)
        from itmatch.threads import configure_threads

        configure_threads(threads)  # torch and numpy's BLAS alike
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)  # for subprocesses; this process is set by set_num_threads
        self.command = " ".join(["python", *sys.argv])
        self.env = environment()
        self.load_start = load_average()
        print(f"# {title}\n# {self.command}\n# torch {self.env['torch']}, {self.env['threads']} thread(s), "
              f"{self.env.get('torch_blas', '?')}; numpy {self.env['numpy_blas']}; load {self.load_start}",
              flush=True)

    def compare(self, arms: dict[str, Callable[[], object]], rounds: int | None = None,
                repeats: int | None = None, warmup: int = 1) -> dict[str, list[float]]:
        """Seconds per call of each arm, one value per round (the mean of `repeats` calls).

        Arms run alternately: round r runs them in the order rotated by r."""
        rounds = rounds or self.args.rounds
        repeats = repeats or self.args.repeats
        names = list(arms)
        for name in names:
            for _ in range(warmup):
                arms[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    arms[name]()
                times[name].append((time.perf_counter() - t0) / repeats)
        return times

    def report(self, times: dict[str, list[float]], *, baseline: str | None = None, unit: str = "ms",
               label: str = "", extra: dict | None = None, rate: tuple[float, str] | None = None) -> dict:
        """Print min / median per arm and ratios to `baseline`; return (and maybe append) the record.

        `rate=(items, name)` also prints items per second of the minimum (e.g. (128, "samples/s"))."""
        scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
        load_end = load_average()
        base = times.get(baseline) if baseline else None
        rows = {}
        if label:
            print(f"-- {label}")
        for name, ts in times.items():
            row = {"min": min(ts), "median": statistics.median(ts), "rounds": len(ts)}
            line = f"{name:34s} min {scale * row['min']:9.2f} {unit}  median {scale * row['median']:9.2f} {unit}"
            if rate:
                line += f"  {rate[0] / row['min']:9.1f} {rate[1]}"
            if base is not None and name != baseline:
                row["ratio_min"] = row["min"] / min(base)
                row["ratio_median"] = row["median"] / statistics.median(base)
                row["ratio_paired"] = statistics.median(t / b for t, b in zip(ts, base, strict=True))
                line += (f"  vs {baseline}: {row['ratio_min']:.2f}x (min) {row['ratio_median']:.2f}x (median) "
                         f"{row['ratio_paired']:.2f}x (paired)")
            rows[name] = row
            print(line, flush=True)
        print(f"   load average {self.load_start[0]:.2f} -> {load_end[0]:.2f}", flush=True)
        record = {"benchmark": self.title, "label": label, "command": self.command, **self.env,
                  "load_before": self.load_start, "load_after": load_end, "baseline": baseline, "unit": "s",
                  "arms": rows, "times": times, **(extra or {})}
        self.load_start = load_end
        if getattr(self.args, "json", None):
            with open(self.args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def record(self, label: str, values: dict) -> dict:
        """A measurement that is not a timed comparison (memory, counts): printed and recorded with the context."""
        load_end = load_average()
        print(f"-- {label}: " + ", ".join(f"{k} {v}" for k, v in values.items()), flush=True)
        print(f"   load average {self.load_start[0]:.2f} -> {load_end[0]:.2f}", flush=True)
        record = {"benchmark": self.title, "label": label, "command": self.command, **self.env,
                  "load_before": self.load_start, "load_after": load_end, **values}
        self.load_start = load_end
        if getattr(self.args, "json", None):
            with open(self.args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)
