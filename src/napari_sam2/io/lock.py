"""One writer at a time per output folder: an advisory ``flock`` on a hidden lock file.

The operating system releases a ``flock`` when its process dies, however it dies, so a crashed run
never leaves a folder locked. The lock file records who holds it (process, host, start time,
command) so that a second run can say who is in its way.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["OutputLock", "OutputLockedError", "LOCK_NAME"]

LOCK_NAME = ".napari-sam2.lock"


class OutputLockedError(RuntimeError):
    """Another run holds the lock of an output folder."""


class OutputLock:
    """Exclusive lock on ``path`` (a lock file), taken by :meth:`acquire` or ``with``.

    Parameters
    ----------
    path
        The lock file; created when missing and removed when released.
    wait
        Seconds to wait for another holder to finish; 0 fails at once.
    what
        What the lock protects, for the error message (e.g. "output folder 'results'").
    """

    def __init__(self, path: str | os.PathLike, wait: float = 0.0, what: str | None = None):
        self.path = Path(path)
        self.wait = float(wait)
        self.what = what or f"'{self.path.parent}'"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        deadline = time.monotonic() + self.wait
        while True:
            try:  # never through a symbolic link: it could point at anything, an input included
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if self.path.is_symlink() or not self.path.is_file():
                    raise OutputLockedError(
                        f"'{self.path}' is not a regular file (a symbolic link or a folder?): napari-sam2 will not "
                        f"write through it. Remove it and run again.") from exc
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise OutputLockedError(
                        f"{self.what} is being written by another napari-sam2 run ({holder}). Wait for it to "
                        "finish, or choose another output folder.") from None
                time.sleep(0.05)
                continue
            # the previous holder may have removed the file between our open and our flock: then we
            # hold a lock on a file nobody else can see, and must start again on the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder_record()).encode())
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # still holding the lock: nobody can be half-way through taking it
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "process unknown"
    return (f"process {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")
