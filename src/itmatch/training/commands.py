"""Handler of `itmatch train`.

The resume rule: a resumed run keeps the config its checkpoint was trained with. Only `train.*` keys
may change (`--set train.epochs=40`: a longer budget, another device). `--config` and other `--set`
values may be repeated as they were (rerunning the first command plus `--resume latest` works), but a
value that differs from the checkpoint's is refused, naming the key, never silently ignored.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

from itmatch.config import Config, _deep_merge, config_from_dict, find_config, load_config, parse_overrides
from itmatch.errors import ItmatchError
from itmatch.run_lock import RunLock


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key} ({vb!r} in the checkpoint, {va!r} asked)"
    return None


def _resume_config(checkpoint: Path, config_path: Path | None, overrides: list[str]) -> Config:
    from itmatch.checkpoint import read_checkpoint_config

    cfg = read_checkpoint_config(checkpoint)
    saved = cfg.to_dict()
    if config_path is not None:
        asked = load_config(config_path, overrides).to_dict()
    else:
        asked = config_from_dict(_deep_merge(copy.deepcopy(saved), parse_overrides(overrides))).to_dict()
    diff = _first_difference({k: v for k, v in asked.items() if k != "train"},
                             {k: v for k, v in saved.items() if k != "train"})
    if diff:
        raise ItmatchError(f"--resume continues {checkpoint} with its own config, but the command line asks for "
                           f"{diff}; only train.* may change on resume (drop --config or that --set)")
    train_overrides = parse_overrides(overrides).get("train", {})
    if train_overrides:
        saved["train"].update(train_overrides)
        cfg = config_from_dict(saved)
    return cfg


def cmd_train(args) -> int:
    config_path = find_config(args.config)
    if args.out:
        run_dir = Path(args.out)
    elif config_path is not None and not (args.resume and args.resume != "latest"):
        run_dir = Path("runs") / config_path.stem
    else:
        raise ItmatchError("give --out RUN_DIR" + ("" if args.resume else " (or --config, whose name names the run)"))
    if run_dir.exists() and not run_dir.is_dir():
        raise ItmatchError(f"--out {run_dir} is a file, not a run folder")
    with contextlib.ExitStack() as stack:
        # Before reading its checkpoints (another process may be writing them); rank 0 of a launch takes it
        # itself, so neither the `--nproc` launcher nor the other ranks hold it.
        if run_dir.is_dir() and not _launching(args) and int(os.environ.get("RANK", "0")) == 0:
            stack.enter_context(RunLock(run_dir))
        return _train(args, run_dir, config_path)


def _launching(args) -> bool:
    """True in the process that `itmatch train --nproc N` turns into a launcher of N ranks."""
    nproc = getattr(args, "nproc", None)
    return nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ


def _train(args, run_dir: Path, config_path: Path | None) -> int:
    from itmatch.training.loop import Trainer
    from itmatch.training.resume import find_resumable

    notes: list[str] = []
    if args.resume:
        if args.resume == "latest":
            checkpoint, notes = find_resumable(run_dir)
        else:
            from itmatch.checkpoint import verify_checkpoint

            checkpoint = Path(args.resume)
            if not checkpoint.is_dir():
                raise ItmatchError(f"--resume {args.resume}: no such checkpoint folder (or use --resume latest)")
            verify_checkpoint(checkpoint, training_state=True)
        cfg = _resume_config(checkpoint, config_path, args.overrides)
    else:
        if (run_dir / "checkpoints").exists() or (run_dir / "best").exists():
            raise ItmatchError(f"run folder {run_dir} already holds a run: use --resume latest, or another --out")
        cfg = load_config(config_path, args.overrides)
        checkpoint = None
    nproc = getattr(args, "nproc", None)
    if _launching(args):
        return _launch_local(args, cfg, run_dir, nproc)  # config and run folder checked: start N ranks
    trainer = Trainer(cfg, run_dir, resume=checkpoint)
    trainer.resume_notes = notes
    result = trainer.fit()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = Path(result["run_dir"]) / "best"
    if result.get("nothing_to_do"):
        print(f"nothing to do: {run_dir} already finished its {result['steps']} steps "
              f"(best dev rSum {result['best_rsum']:.2f}; best checkpoint: {best}); "
              "raise train.epochs or train.max_steps with --set to train further", file=sys.stderr)
        return 0
    where = (f"best checkpoint: {best}" if (best / "config.json").is_file() else
             f"no checkpoint beat the best dev rSum {result['best_rsum']:.2f} carried over from {checkpoint}, "
             f"so {run_dir} has no best/ checkpoint")
    print(f"best dev rSum {result['best_rsum']:.2f} after {result['steps']} steps; {where}")
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
    if getattr(args, "threads", None):
        argv += ["--threads", str(args.threads)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "itmatch", *argv]
    return subprocess.run(cmd, check=False).returncode
