"""Train several configs on the same scenes data with the same budget, evaluate each on test, and
print one markdown table (R@K, rSum, mAP@R, R-Precision, twin accuracy, training wall time).

Each config is run exactly as a user would run it:

    itmatch train --config C --out OUT/C --set data.root=DATA [--set ...]
    itmatch eval OUT/C --split test --output OUT/C.test.json

    python benchmarks/compare_scenes.py --data DIR --out /tmp/cmp \
        vse_scenes vse_dias_scenes hrem_scenes hrem_dias_scenes hrem_scenes_standalone dias_scenes

`--table-only` skips training and reads OUT/C.test.json and OUT/C/out.log of earlier runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

COLUMNS = [("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"),
           ("t2i_r10", "R@10"), ("rsum", "rSum"), ("map_at_r_i2t", "mAP@R i2t"), ("map_at_r_t2i", "mAP@R t2i"),
           ("rprecision_i2t", "R-P i2t"), ("rprecision_t2i", "R-P t2i"), ("twin_acc_i2t", "twin i2t"),
           ("twin_acc_t2i", "twin t2i")]
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")
_BEST_DEV = re.compile(r"done: best dev rSum ([0-9.]+)")


def itmatch(*args: str) -> None:
    cmd = [sys.executable, "-m", "itmatch.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def train_minutes(run: Path) -> float | None:
    """Wall time of the training run from the first and last time stamps of its out.log."""
    log = run / "out.log"
    if not log.exists():
        return None
    stamps = [m.group(1) for line in log.read_text().splitlines() if (m := _STAMP.match(line))]
    if len(stamps) < 2:
        return None
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def best_dev_rsum(run: Path) -> str:
    log = run / "out.log"
    found = _BEST_DEV.findall(log.read_text()) if log.exists() else []
    return f"{float(found[-1]):.1f}" if found else "-"


def table(out: Path, configs: list[str]) -> str:
    head = "| config | " + " | ".join(name for _, name in COLUMNS) + " | best dev rSum | train min |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for c in configs:
        report = json.loads((out / f"{c}.test.json").read_text())
        m = report["metrics"]
        minutes = train_minutes(out / c)
        cells = [f"{m[k]:.1f}" if k in m else "-" for k, _ in COLUMNS]
        cells.append(best_dev_rsum(out / c))
        rows.append(f"| `{c}` | " + " | ".join(cells) + (f" | {minutes:.1f} |" if minutes else " | - |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--data", required=True, help="a scenes folder (itmatch data scenes --out DIR)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every run")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        for c in args.configs:
            t0 = time.perf_counter()
            sets = [x for kv in [f"data.root={args.data}", *args.set] for x in ("--set", kv)]
            itmatch("train", "--config", c, "--out", str(args.out / c), *sets)
            itmatch("eval", str(args.out / c), "--split", "test", "--output", str(args.out / f"{c}.test.json"))
            print(f"{c}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    print(table(args.out, args.configs))


if __name__ == "__main__":
    main()
