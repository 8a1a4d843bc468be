"""Progress for long loops: a tqdm bar on a terminal, a timestamped line every ~30 s elsewhere.

With stderr going to a file or a CI log, tqdm stays silent and minutes of work looked like a hang
(scenes generation printed nothing for 6 minutes). There, a plain line is written when at least
`progress_seconds()` passed since the last one (ITMATCH_PROGRESS_SECONDS, default 30).
"""

from __future__ import annotations

import os
import sys
import time


def progress_seconds() -> float:
    try:
        return float(os.environ.get("ITMATCH_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0


class TimedProgress:
    """The part of tqdm's interface the loops use (update, close, a context manager), as timed lines."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= progress_seconds() and self.n < self.total:
            self._last = now
            rate = self.n / max(1e-9, now - self._start)
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {self.desc}: {self.n}/{self.total} {self.unit} "
                  f"({100 * self.n / max(1, self.total):.0f}%, {rate:.1f} {self.unit}/s)", file=sys.stderr, flush=True)

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> TimedProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool | None = None):
    """`enabled`: None = tqdm on a terminal, timed lines otherwise; True forces tqdm; False is silent."""
    from tqdm import tqdm

    if enabled is None and not sys.stderr.isatty():
        return TimedProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=enabled is False, leave=False)
