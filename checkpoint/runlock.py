"""One writer per run directory: an exclusive flock on `<run>/run.lock`, held by rank 0 for the run's lifetime.

The kernel drops a flock when its process exits, however it exits (kill -9, OOM killer, node reboot), so
a crash can never leave a stale lock. The file itself stays and names the last holder (pid and host),
which the refusal quotes. The `filelock` package is not used here: it truncates the file on every
attempt, which would erase the holder's name before a second run could read it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from common.errors import ProjectError

LOCK_FILE = "run.lock"


class RunDirInUse(ProjectError):
    pass


class RunLock:
    _held: set[RunLock] = set()  # so main() can release what a run that raised still holds

    def __init__(self, run_path: Path) -> None:
        self.path = run_path / LOCK_FILE
        self._fd: int | None = None

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held):
            lock.release()

    def acquire(self) -> None:
        """Take the lock or raise RunDirInUse (one line naming the run directory and the holder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirInUse(f"run directory {self.path.parent} is in use by another run ({holder}); wait for "
                              f"it to finish, or set logging.run_name to start a separate run") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        RunLock._held.add(self)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        RunLock._held.discard(self)
