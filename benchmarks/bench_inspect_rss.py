"""Peak RSS of the NaN/inf scan over a large feature file: `itmatch data inspect` now vs the former
scan through one memory map (np.asarray of each chunk of an mmap'ed array).

A sparse file (holes read as zeros, so it costs no disk) of --gib GiB with a valid .npy header plays
a train_ims.npy. Each arm runs in its own process; peak RSS is that process's ru_maxrss (os.wait4).
Arms alternate in rounds. Run:

    /work/bin/heavy python benchmarks/bench_inspect_rss.py --gib 5 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAPPED_SCAN = """
import sys, numpy as np
f = np.load(sys.argv[1], mmap_mode="r")
rows = max(1, (64 << 20) // (f.shape[1] * f.shape[2] * f.itemsize))
bad = 0
for s in range(0, f.shape[0], rows):
    c = np.asarray(f[s:s + rows])
    bad += int((~np.isfinite(c.reshape(c.shape[0], -1)).all(1)).sum())
print(bad)
"""


def make_folder(root: Path, gib: float, regions: int = 36, dim: int = 2048) -> Path:
    n = int(gib * 2**30 // (regions * dim * 4))
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, regions, dim)}
    path = root / "train_ims.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + n * regions * dim * 4)  # a hole: zeros, no disk blocks
    (root / "train_caps.txt").write_text("".join(f"a photo number {i}\n" for i in range(n)), encoding="utf-8")
    return path


def run(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to put the sparse file (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = make_folder(Path(tmp), args.gib)
        size = path.stat().st_size / 2**30
        print(f"sparse {path.name}: {size:.2f} GiB (blocks on disk: {path.stat().st_blocks * 512 / 2**20:.1f} MiB)")
        arms = {
            "memory map (before)": [sys.executable, "-c", MAPPED_SCAN, str(path)],
            "itmatch data inspect": [sys.executable, "-m", "itmatch", "data", "inspect", tmp, "--split", "train"],
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in arms}
        for r in range(args.rounds):
            for name, cmd in (arms.items() if r % 2 == 0 else reversed(arms.items())):
                results[name].append(run(cmd))
                print(f"round {r + 1}: {name:22s} peak RSS {results[name][-1][0]:.2f} GiB, "
                      f"{results[name][-1][1]:.1f} s", flush=True)
        peak = {k: max(v[0] for v in vals) for k, vals in results.items()}
        print(f"\npeak RSS over {args.rounds} rounds on a {size:.2f} GiB file:")
        for k, v in peak.items():
            print(f"  {k:22s} {v:.2f} GiB")
        print(f"ratio before/now: {peak['memory map (before)'] / peak['itmatch data inspect']:.1f}x")


if __name__ == "__main__":
    main()
