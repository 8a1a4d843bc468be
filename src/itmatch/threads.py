"""How many CPU threads torch may use: the CPUs this process may actually run on.

torch sizes its intra-op pool from the machine's cores. In a container limited by a cgroup CPU quota,
or under `taskset`, that over-subscribes the CPUs the process really has, and every op waits on
threads that cannot run (measured in benchmarks/bench_threads.py). The count here is the smaller of
the CPU affinity mask and the cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up.
`--threads N` overrides it, and so does an explicit OMP_NUM_THREADS.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = _CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 = unlimited
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = _CGROUP) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, where the number came from)."""
    if requested is not None:
        return max(1, requested), "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return available_cpus(), "available CPUs"


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads, and numpy's BLAS pool to the same count; returns the number set.

    numpy's OpenBLAS sizes its own pool from the machine and ignores torch's setting: GPO's CPU
    kernels (numpy matmuls in the rank GRU) then ran 2 BLAS threads beside a 1-thread torch and made
    the vse step slower under load (bench_training: 1.32x mean pooling against 1.20x when limited)."""
    import torch
    from threadpoolctl import threadpool_limits

    n, _ = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")  # process-wide until changed again
    return n
