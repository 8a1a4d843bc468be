"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step, save a checkpoint, say how to resume.

Without this, an interrupt lost every step since the last periodic checkpoint and printed nothing
useful. The first signal only sets a flag that the training loop reads at the next step boundary; a
second one interrupts at once, for a user who really means it.
"""

from __future__ import annotations

import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the loop after it saved the interrupted step; the message says how to resume."""


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.requested:` save and stop. Signal handlers can only be
    installed from the main thread; elsewhere (a training started from a worker thread), or when not
    `enabled` (several ranks, which would have to agree on the step), this is inert."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.requested: str | None = None
        self.enabled = enabled
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"itmatch: {self.requested} received: stopping after this step with a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
