"""What a run writes while it trains: `out.log`, `metrics.jsonl`, TensorBoard events.

Plain timestamped lines go to `out.log` (and to stderr when it is not a terminal, so CI logs stay
readable); on a terminal a tqdm bar shows the loss and samples/s instead. Each logged record is one
JSON line in `metrics.jsonl`, which the plots and the demo report read back.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from itmatch.progress import progress_seconds


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, echo: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / "out.log", "a", encoding="utf-8")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.interactive = sys.stderr.isatty()
        self.echo = echo
        self._last_line = time.monotonic()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events its replayed steps had written
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but a run must not die without it
                self.line("tensorboard is not installed: no event files will be written")

    def progress_due(self) -> bool:
        """True when no line was written for `progress_seconds()`: the loop then logs its position."""
        return time.monotonic() - self._last_line >= progress_seconds()

    def line(self, text: str) -> None:
        self._last_line = time.monotonic()
        stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        self._log.write(stamped + "\n")
        self._log.flush()
        if self.echo:
            if self.interactive:
                from tqdm import tqdm

                tqdm.write(text, file=sys.stderr)
            else:
                print(stamped, file=sys.stderr, flush=True)

    def record(self, kind: str, step: int, epoch: int, values: dict) -> None:
        rec = {"kind": kind, "step": step, "epoch": epoch, "time": round(time.time(), 3)}
        rec.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._log.close()
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed process
    return out
