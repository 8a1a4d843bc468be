"""Continuing a run: which checkpoint to resume from, and how a run's records are made to match it.

`--resume latest` reads `checkpoints/LATEST`, but a disk that filled up, a copy cut short or a hand edit
can leave that checkpoint damaged. Each candidate is verified against its manifest (sizes and sha256,
see checkpoint.py), newest first; an older valid checkpoint is used with a note saying which one was
skipped and why, and when none is valid the error names each problem.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from itmatch import checkpoint as ckpt
from itmatch.errors import ItmatchError
from itmatch.files import atomic_write_text

LATEST = "LATEST"


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_resumable(run_dir: str | Path) -> tuple[Path, list[str]]:
    """(checkpoint folder, notes): the newest checkpoint of the run that verifies, newest = LATEST first."""
    folder = Path(run_dir) / "checkpoints"
    marker = folder / LATEST
    named = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
    steps = sorted((p for p in folder.glob("step-*") if p.is_dir() and not p.name.startswith(".")),
                   key=_step_of, reverse=True)
    candidates = ([folder / named] if named else []) + [p for p in steps if p.name != named]
    if not candidates:
        raise ItmatchError(f"nothing to resume: {run_dir} has no checkpoints/{LATEST} and no checkpoint folders")
    problems = []
    for cand in candidates:
        try:
            if not cand.is_dir():
                raise ItmatchError(f"{cand} is missing")
            ckpt.verify_checkpoint(cand, training_state=True)
            ckpt.read_checkpoint_config(cand)
        except ItmatchError as exc:
            problems.append(str(exc))
            continue
        notes = [f"warning: skipped a damaged checkpoint ({p}); resuming from {cand.name} instead"
                 for p in problems]
        return cand, notes
    raise ItmatchError(f"nothing to resume in {run_dir}: every checkpoint is damaged ({'; '.join(problems)})")


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the records of `metrics.jsonl` logged after `step` (the steps a resumed run replays).
    Returns how many were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut by a killed process
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{ln}\n" for ln in keep))
    return dropped


def resume_command(run_dir: str | Path) -> str:
    return f"itmatch train --out {shlex.quote(str(run_dir))} --resume latest"
