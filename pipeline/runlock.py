"""One run per job: an advisory lock file beside the checkpoint.

The lock is an `flock` held by the running process, so the operating system
releases it when the process ends in any way (a `kill -9` included): there is no
stale lock to clean up. The file also says who holds it, for the message the
second run prints. Readers (`status`, `export`) never take it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from pipeline.errors import SpecError

LOCK_NAME = "run.lock"


class JobLocked(SpecError):
    """Another process is running this job (same checkpoint)."""


class RunLock:
    """Held from `acquire` until `release` (or until the process dies)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise JobLocked(
                f"another run ({holder}) is working on this job (lock {self.path}); "
                "wait for it to finish or stop it. `pipeline status` shows its progress"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor drops the flock; the file stays for the next run.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        pid, since = os.pread(fd, 100, 0).decode().split()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
        return f"pid {int(pid)}, since {started}"
    except (OSError, ValueError):
        return "pid unknown, since just now"
