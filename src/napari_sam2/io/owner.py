"""Which process left a temporary file or folder behind, and whether it is still running.

Temporaries (``.NAME.partial-...`` next to an output, spill folders in the temp folder) carry an
owner tag ``PID@HOST`` in their name. A temporary whose owner is a dead process on this machine is
a leftover of a crash, a ``kill -9`` or a power cut, and the next run removes it. Temporaries of
other machines (a shared file system seen by Dask workers on several hosts) are never touched:
their owners cannot be checked from here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from pathlib import Path

__all__ = ["owner_tag", "owner_alive", "remove_stale", "TAG_PATTERN"]

#: ``PID@HOST`` as it appears in names (HOST: 6 hex digits of the host name's hash).
TAG_PATTERN = r"(?P<pid>\d+)@(?P<host>[0-9a-f]{6})"


def _host() -> str:
    # a hash, not the name itself: host names may hold characters that are not safe in file names
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``PID@HOST`` of this process."""
    return f"{os.getpid()}@{_host()}"


def owner_alive(pid: int, host: str) -> bool:
    """False only when the owner certainly is gone: a process of this machine that no longer runs."""
    if host != _host():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_stale(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove the entries of ``folder`` whose name matches ``pattern`` (a regex holding
    :data:`TAG_PATTERN`) and whose owner is dead; returns what was removed. Errors are ignored:
    a leftover that cannot be removed now is tried again by the next run."""
    regex = re.compile(pattern)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = regex.fullmatch(entry.name)
        if match is None or owner_alive(int(match["pid"]), match["host"]):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed
