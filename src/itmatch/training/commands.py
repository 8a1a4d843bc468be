"""Handlers of `itmatch train`, `itmatch eval` and `itmatch demo`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from itmatch.config import Config, config_from_dict, load_config, parse_overrides
from itmatch.errors import ItmatchError

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def find_config(name: str | None) -> Path | None:
    """A path as given, or the name of a packaged config (`vse_scenes` or `vse_scenes.yaml`)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix else path.name + ".yaml")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ItmatchError(f"config file not found: {name} (packaged configs: {known})")


def _resume_config(run_dir: Path, overrides: list[str]) -> Config:
    from itmatch.training.checkpoint import read_checkpoint_config
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
            from itmatch.training.checkpoint import read_checkpoint_config

            cfg = read_checkpoint_config(args.resume)
    else:
        if (run_dir / "checkpoints").exists() or (run_dir / "best").exists():
            raise ItmatchError(f"run folder {run_dir} already holds a run: use --resume latest, or another --out")
        cfg = load_config(config_path, args.overrides)
    result = Trainer(cfg, run_dir, resume=args.resume).fit()
    print(f"best dev rSum {result['best_rsum']:.2f} after {result['steps']} steps; "
          f"best checkpoint: {Path(result['run_dir']) / 'best'}")
    return 0


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "best" / "config.json").is_file():
        return path / "best"
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ItmatchError(f"{path} is neither a run folder with a best/ checkpoint nor a checkpoint folder")
    raise ItmatchError(f"checkpoint not found: {path}")


def evaluate_checkpoint(checkpoint: Path, data: str | None, split: str, protocol: str | None,
                        batch_size: int = 256, device: str = "auto"):
    """(report, sims, split) for a checkpoint on one split."""
    import time

    from itmatch import __version__
    from itmatch.evaluation.encode import score_split
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.training.checkpoint import from_pretrained
    from itmatch.training.data_setup import load_configured_split, resolve_data_root
    from itmatch.training.loop import resolve_device

    dev = resolve_device(device)
    model, tokenizer, cfg = from_pretrained(checkpoint, dev)
    data_cfg = replace(cfg.data, root=data) if data else cfg.data
    root = resolve_data_root(data_cfg)
    split_data = load_configured_split(data_cfg, split, root, check_finite=True)
    t0 = time.perf_counter()
    sims = score_split(model, split_data, tokenizer, cfg.model, batch_size, dev)
    encode_s = time.perf_counter() - t0
    if protocol is None:
        protocol = "scenes" if split_data.relevance is not None else "plain"
    report = evaluate_sims(sims, protocol, split_data, dataset=str(root), split_name=split)
    report.update({"method": cfg.model.method, "checkpoint": str(checkpoint), "encode_and_score_s": round(encode_s, 3),
                   "version": __version__})
    return report, sims, split_data


def cmd_eval(args) -> int:
    from itmatch.evaluation.report import format_report, write_report

    checkpoint = resolve_checkpoint(args.checkpoint)
    report, sims, _ = evaluate_checkpoint(checkpoint, args.data, args.split, args.protocol,
                                          args.batch_size, args.device)
    print(format_report(report))
    if args.output:
        write_report(report, args.output)
        print(f"report written to {args.output}")
    if args.save_sims:
        from itmatch.training.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(args.save_sims), lambda f: np.save(f, sims, allow_pickle=False))
        print(f"similarities ({sims.shape[0]} images x {sims.shape[1]} captions) written to {args.save_sims}")
    return 0


def cmd_demo(args) -> int:
    from itmatch.training.demo import run_demo

    run_demo(out=Path(args.out), data=Path(args.data) if args.data else None, size=args.size, epochs=args.epochs)
    return 0

