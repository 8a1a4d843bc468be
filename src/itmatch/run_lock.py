"""One writer per run folder: an exclusive lock on `RUN/run.lock` while a run trains.

Two trainings into one folder would interleave their logs and overwrite each other's checkpoints and
`best/` without a word. The lock is an `fcntl.flock` on `run.lock`, which the kernel drops when its
holder exits in any way (even `kill -9`), so a lock can never outlive its process on this machine.
The file records the holder (pid, host, start time, command) for the refusal message and is emptied
on a clean release; finding it non-empty with the lock free means its last holder died, which is
reported and taken over. Where the filesystem refuses flock (some network mounts), the recorded
pid and host decide instead: a live pid on this host, or any other host, holds the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from itmatch.errors import ItmatchError

LOCK_NAME = "run.lock"
# Locks this process holds, by path, with a count: `itmatch train` takes the lock before it reads the
# checkpoints to resume, and the trainer takes it again (a second flock on a new descriptor would
# conflict with the first, even in one process).
_HELD: dict[Path, list] = {}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {started})"


class RunLock:
    """`with RunLock(run_dir) as lock:` ... ; `lock.stale` describes a dead holder that was taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            self._fd, self.stale = _HELD[key][0], _HELD[key][2]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                self._refuse(_read_holder(self.path))
            # flock unsupported here (ENOLCK, EINVAL...): decide from the recorded holder
            holder = _read_holder(self.path)
            if holder and (holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", -1)))):
                if holder.get("pid") != os.getpid():
                    os.close(fd)
                    self._refuse(holder, hint=f"; if that process is gone, delete {self.path}")
        holder = _read_holder(self.path)
        if holder:
            self.stale = f"the run's previous process ({_describe(holder)}) ended without releasing its lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        _HELD[key] = [fd, 1, self.stale]
        return self

    def _refuse(self, holder: dict | None, hint: str = "") -> None:
        raise ItmatchError(f"run folder {self.path.parent} is in use by {_describe(holder)}: wait for that run "
                           f"to finish, or choose another --out{hint}")

    def release(self) -> None:
        if self._fd is None:
            return
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] -= 1
            if _HELD[key][1] > 0:
                self._fd = None
                return
            del _HELD[key]
        try:
            os.ftruncate(self._fd, 0)  # an empty file = released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
