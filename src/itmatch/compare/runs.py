"""The runs of a comparison: train (or resume, or skip) each config x seed, evaluate, cache.

A run folder DIR/runs/<label>-s<seed> is an ordinary `itmatch train` run folder plus:
    finished.json          written after Trainer.fit returned: the run is complete, never retrained
    eval-<split>.json      the evaluation report of best/ on that split, with the cache key
    eval-<split>.npz       the per-query arrays behind the bootstrap (0-based ranks, mAP@R, R-P)
A folder with checkpoints/LATEST but no finished.json was interrupted and is resumed from its latest
checkpoint; a folder without a checkpoint to resume from is removed and trained from the start.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from itmatch.config import Config, load_config
from itmatch.errors import ItmatchError
from itmatch.files import atomic_write_bytes, atomic_write_text

FINISHED = "finished.json"
RECALL_KS = (1, 5, 10)
# protocols whose recalls are those of the whole matrix (coco-1k averages five sub-matrices)
WHOLE_MATRIX_PROTOCOLS = ("plain", "f30k-1k", "coco-5k", "scenes", "eccv")


@dataclass
class Arm:
    """One compared configuration: its label, the config file and the overrides only it gets."""

    label: str
    config: str  # as the user named it
    path: Path  # resolved config file
    overrides: list[str] = field(default_factory=list)


@dataclass
class Run:
    arm: Arm
    seed: int
    run_dir: Path
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.arm.label}-s{self.seed}"


def run_config(arm: Arm, seed: int, overrides: list[str]) -> Config:
    """The config of one run: the file, the shared overrides, the arm's own, then the seed."""
    return load_config(arm.path, [*overrides, *arm.overrides, f"train.seed={seed}"])


# ------------------------------------------------------------------------------- matrices
def _as_matrix(sims) -> np.ndarray:
    """A dense images x captions ndarray from an ndarray, a torch tensor or a score source with .dense()."""
    if isinstance(sims, np.ndarray):
        return sims
    if hasattr(sims, "dense") and callable(sims.dense):
        return _as_matrix(sims.dense())
    try:
        import torch

        if isinstance(sims, torch.Tensor):
            return sims.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    raise ItmatchError(f"cannot read similarity scores of type {type(sims).__name__}: expected an array, "
                       f"a tensor or an object with .dense()")


# ------------------------------------------------------------------------------- training
def _differing_key(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return prefix + str(k)
            found = _differing_key(a[k], b[k], f"{prefix}{k}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def check_run_compatible(run: Run) -> None:
    """A run folder that already exists must have been trained with exactly this run's config."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        old = None
    # the form config.yaml is written in: without the keys the method ignores
    new = yaml.safe_load(run.cfg.to_yaml())
    # where a run trains, and what it logs, do not change what it is
    ignored = ("device", "grad_norm_every_steps")
    if isinstance(old, dict):
        old = {**old, "train": {k: v for k, v in (old.get("train") or {}).items() if k not in ignored}}
    new["train"] = {k: v for k, v in new["train"].items() if k not in ignored}
    if old != new:
        key = _differing_key(old, new) if isinstance(old, dict) else "config.yaml"
        raise ItmatchError(f"{run.run_dir} was trained with a different config (first difference: {key}): "
                           f"choose another --out, or remove that run folder")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED).is_file() and (run_dir / "best" / "model.safetensors").is_file()


def ensure_trained(run: Run, say: Callable[[str], None], device: str | None = None) -> dict:
    """Train the run unless it is finished; resume it when interrupted. Returns its finished.json record."""
    from dataclasses import replace

    from itmatch.training.loop import LATEST, Trainer

    run_dir = run.run_dir
    if is_finished(run_dir):
        record = json.loads((run_dir / FINISHED).read_text(encoding="utf-8"))
        say(f"{run.name}: finished earlier, not retrained")
        return {**record, "status": "cached"}
    cfg = run.cfg if device is None else replace(run.cfg, train=replace(run.cfg.train, device=device))
    resume = None
    latest = run_dir / "checkpoints" / LATEST
    if latest.is_file() and (run_dir / "checkpoints" / latest.read_text(encoding="utf-8").strip()).is_dir():
        resume = "latest"
        say(f"{run.name}: interrupted earlier, resuming from its latest checkpoint")
    else:
        if run_dir.exists():
            say(f"{run.name}: incomplete and nothing to resume from, training from the start")
            shutil.rmtree(run_dir)
        else:
            say(f"{run.name}: training")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume, echo=False)
    trainer.resume_hint = "the same itmatch compare command (it resumes interrupted runs)"
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    record = {"best_dev_rsum": float(result["best_rsum"]), "steps": int(result["steps"]),
              "train_s": round(seconds, 2), "resumed": resume is not None}
    if not (run_dir / "best" / "model.safetensors").is_file():
        raise ItmatchError(f"{run.name}: training ended without a best/ checkpoint")
    atomic_write_text(run_dir / FINISHED, json.dumps(record, indent=2) + "\n")
    say(f"{run.name}: done in {seconds:.1f} s, best dev rSum {record['best_dev_rsum']:.2f}")
    return {**record, "status": "resumed" if resume else "trained"}


# ----------------------------------------------------------------------------- evaluation
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def per_query_arrays(sims, split_data, protocol: str) -> dict[str, np.ndarray]:
    """Per-query arrays of one evaluation: 0-based ground-truth ranks and, for scenes, mAP@R and R-P,
    computed by the protocol's own per-query function so that their means are the report's values.

    Scores are read from one materialised matrix, as the report reads them (`scores.materialise`).
    """
    from itmatch.evaluation.protocols import scenes_queries
    from itmatch.evaluation.ranking import ground_truth_ranks
    from itmatch.evaluation.scores import ScoreSource, as_score_source, materialise

    mat = materialise(as_score_source(sims if isinstance(sims, ScoreSource) else _as_matrix(sims)))
    if protocol == "scenes" and split_data.relevance is not None:
        q = scenes_queries(mat, split_data)
        return {"caption_to_image": q.caption_to_image, "i2t_rank": q.ranks.i2t, "t2i_rank": q.ranks.t2i,
                "map_at_r_i2t": q.i2t.map_at_r, "map_at_r_t2i": q.t2i.map_at_r,
                "rprecision_i2t": q.i2t.r_precision, "rprecision_t2i": q.t2i.r_precision}
    c2i = np.asarray(split_data.caption_to_image, dtype=np.int64)
    out: dict[str, np.ndarray] = {"caption_to_image": c2i}
    if protocol in WHOLE_MATRIX_PROTOCOLS:
        ranks = ground_truth_ranks(mat, c2i)
        out["i2t_rank"], out["t2i_rank"] = ranks.i2t, ranks.t2i
    return out


def query_metrics(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """metric -> (per-query values in percent, the test image of each query or None for image queries).

    The mean of each array is the report's metric of the same name (R@K: rank < K).
    """
    c2i = arrays["caption_to_image"]
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if "i2t_rank" in arrays:
        for k in RECALL_KS:
            out[f"i2t_r{k}"] = (100.0 * (arrays["i2t_rank"] < k), None)
        for k in RECALL_KS:
            out[f"t2i_r{k}"] = (100.0 * (arrays["t2i_rank"] < k), c2i)
    for name in ("map_at_r", "rprecision"):
        for direction in ("i2t", "t2i"):
            key = f"{name}_{direction}"
            if key in arrays:
                out[key] = (100.0 * np.asarray(arrays[key], np.float64), None if direction == "i2t" else c2i)
    return out


def evaluate_run(run: Run, split: str, protocol: str | None, batch_size: int, device: str,
                 say: Callable[[str], None]) -> tuple[dict, dict[str, np.ndarray], str]:
    """(report, per-query arrays, status) of the run's best checkpoint on a split; cached in the run folder."""
    best = run.run_dir / "best"
    json_path, npz_path = run.run_dir / f"eval-{split}.json", run.run_dir / f"eval-{split}.npz"
    key = {"split": split, "protocol": protocol, "checkpoint_sha256": _file_digest(best / "model.safetensors")}
    if json_path.is_file() and npz_path.is_file():
        try:
            cached = json.loads(json_path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                with np.load(npz_path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                say(f"{run.name}: evaluation on {split} cached")
                return cached["report"], arrays, "cached"
        except (json.JSONDecodeError, OSError, ValueError, KeyError):
            pass  # a damaged cache is recomputed
    from itmatch.evaluation.commands import evaluate_checkpoint
    from itmatch.evaluation.report import _plain

    report, sims, split_data = evaluate_checkpoint(best, None, split, protocol, batch_size, device)
    arrays = per_query_arrays(sims, split_data, report["protocol"])
    atomic_write_bytes(npz_path, lambda f: np.savez(f, **arrays))
    atomic_write_text(json_path, json.dumps({"key": key, "report": _plain(report)}, indent=2, allow_nan=False) + "\n")
    say(f"{run.name}: evaluated on {split} (rSum {report['metrics'].get('rsum', float('nan')):.2f})")
    return _plain(report), arrays, "evaluated"
