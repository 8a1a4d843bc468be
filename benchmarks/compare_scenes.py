"""Compare configs on one scenes folder: a thin caller of `itmatch compare` (see docs/compare.md).

    python benchmarks/compare_scenes.py --data DIR --out /tmp/cmp \
        vse_scenes vse_dias_scenes hrem_scenes hrem_dias_scenes hrem_scenes_standalone dias_scenes

is `itmatch compare CONFIGS --out OUT --set data.root=DIR --baseline FIRST [--seeds N] [--set ...]`:
every config x seed trains with the same budget into OUT/runs/<config>-s<seed>, is evaluated on
test, and OUT/compare.md holds mean ± 95% CI over seeds and paired differences to the baseline.
Runs that finished earlier are reused, so a second call only rewrites the tables.
"""

from __future__ import annotations

import argparse
import sys

from itmatch.cli import main as itmatch_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--data", required=True, help="a scenes folder (itmatch data scenes --out DIR)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="default: the first config")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every run")
    args = ap.parse_args()
    argv = ["compare", *args.configs, "--out", args.out, "--seeds", str(args.seeds),
            "--baseline", args.baseline or args.configs[0], "--set", f"data.root={args.data}"]
    for kv in args.set:
        argv += ["--set", kv]
    return itmatch_main(argv)


if __name__ == "__main__":
    sys.exit(main())
