"""Handler of `itmatch train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from itmatch.config import Config, config_from_dict, find_config, load_config, parse_overrides
from itmatch.errors import ItmatchError


def _resume_config(run_dir: Path, overrides: list[str]) -> Config:
    from itmatch.checkpoint import read_checkpoint_config
    from itmatch.training.loop import latest_checkpoint

    cfg = read_checkpoint_config(latest_checkpoint(run_dir))
    bad = [k for k in parse_overrides(overrides) if k != "train"]
    if bad:
        raise ItmatchError(f"--resume keeps the run's own config; only train.* may be overridden, not '{bad[0]}'")
    if overrides:
        merged = cfg.to_dict()
        for key, value in parse_overrides(overrides)["train"].items():
            merged["train"][key] = value
        cfg = config_from_dict(merged)
    return cfg


def cmd_train(args) -> int:
    from itmatch.training.loop import Trainer

    config_path = find_config(args.config)
    if args.out:
        run_dir = Path(args.out)
    elif config_path is not None:
        run_dir = Path("runs") / config_path.stem
    else:
        raise ItmatchError("give --out RUN_DIR (or --config, whose name names the run)")
    if args.resume:
        if args.resume == "latest":
            cfg = _resume_config(run_dir, args.overrides)
        else:
            from itmatch.checkpoint import read_checkpoint_config

            cfg = read_checkpoint_config(args.resume)
    else:
        if (run_dir / "checkpoints").exists() or (run_dir / "best").exists():
            raise ItmatchError(f"run folder {run_dir} already holds a run: use --resume latest, or another --out")
        cfg = load_config(config_path, args.overrides)
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ:
        return _launch_local(args, cfg, run_dir, nproc)  # config and run folder checked: start N ranks
    result = Trainer(cfg, run_dir, resume=args.resume).fit()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"best dev rSum {result['best_rsum']:.2f} after {result['steps']} steps; "
          f"best checkpoint: {Path(result['run_dir']) / 'best'}")
    return 0


def _launch_local(args, cfg: Config, run_dir: Path, nproc: int) -> int:
    """`itmatch train --nproc N`: the same command on N processes of this machine, through torchrun."""
    if nproc < 1:
        raise ItmatchError(f"--nproc must be >= 1, got {nproc}")
    sc = cfg.sampler
    batch = sc.clusters_per_batch * sc.images_per_cluster if sc.kind == "neighbour" else cfg.train.batch_size
    if batch % nproc:  # each rank would say so; one line here is clearer than N tracebacks from torchrun
        raise ItmatchError(f"the global batch of {batch} pairs does not split over {nproc} processes: make it a "
                           "multiple of the number of processes")
    argv = ["train", "--out", str(run_dir)]
    if args.config:
        argv += ["--config", str(args.config)]
    for override in args.overrides:
        argv += ["--set", override]
    if args.resume:
        argv += ["--resume", str(args.resume)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "itmatch", *argv]
    return subprocess.run(cmd, check=False).returncode
