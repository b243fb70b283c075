"""Write-then-rename: outputs appear complete or not at all.

Every writer writes under a temporary name in the destination folder
(``.NAME.partial-PID@HOST-XXXXXXXX``, hidden and clearly unfinished) and renames
it to the final name only once everything is written. A crash or an exception
leaves no file or folder under the final name; the temporary is removed when
Python gets the chance, and by :func:`remove_stale_partials` of a later run when
the process that made it died without that chance (``kill -9``, power cut).
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .owner import TAG_PATTERN, owner_tag, remove_stale

PARTIAL_MARK = ".partial-"
_PARTIAL_NAME = r"\..+" + re.escape(PARTIAL_MARK) + TAG_PATTERN + r"-[0-9a-f]{8}"


class OutputWriteError(OSError):
    """An output could not be written (unwritable folder, disk full, ...).

    The message names the path; ``errno`` and ``filename`` are those of the
    underlying `OSError`.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return self.message


def write_error(exc: OSError, path: Path) -> OutputWriteError:
    """Wrap an `OSError` into an `OutputWriteError` whose message names `path`."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    if exc.errno == _errno.ENOSPC:
        advice = "free some disk space or write somewhere else"
    elif exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        advice = "choose a folder you can write to, or fix its permissions"
    elif exc.errno in (_errno.ENOTDIR, _errno.ENOENT):
        advice = "check that the parent folder path is right (and is a folder)"
    else:
        advice = "check that the folder exists, is writable and has free space"
    return OutputWriteError(f"could not write '{path}': {reason}; {advice}. "
                            "Nothing was left under that name.", errno=exc.errno, filename=str(path))


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden temporary name next to `path`: ``.NAME.partial-PID@HOST-XXXXXXXX``."""
    return path.parent / f".{path.name}{PARTIAL_MARK}{owner_tag()}-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in `folder` left by dead processes of this machine."""
    return remove_stale(folder, _PARTIAL_NAME)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def prepare_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check that `path` may be written and create its parent folder.

    Raises
    ------
    FileExistsError
        If `path` exists and `overwrite` is False.
    OutputWriteError
        If the parent folder cannot be created.
    """
    path = Path(path).expanduser()
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"'{path}' already exists; remove it, choose another name, "
                              "or pass overwrite=True")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path) from exc
    return path


def publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished temporary `tmp` to `final` (replacing it if `overwrite`)."""
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise FileExistsError(f"'{final}' appeared while writing; the result is kept at "
                                  f"'{tmp}'")
        if final.is_dir() and not final.is_symlink():
            # directories cannot be replaced in one step: move the old one aside first
            old = temporary_sibling(final)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)  # put the previous result back
                raise
            _remove(old)
            return
    os.replace(tmp, final)


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False,
                directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it to `path` when the block succeeds.

    Parameters
    ----------
    path : path-like
        The final file or folder name.
    overwrite : bool
        Replace an existing `path`.
    directory : bool
        Create the temporary as an (empty) folder before yielding it.

    On an exception inside the block the temporary is removed and the
    exception re-raised (an `OSError` as `OutputWriteError` naming `path`).
    """
    final = prepare_destination(path, overwrite)
    tmp = temporary_sibling(final)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
    except OutputWriteError:
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        if exc.filename and not str(exc.filename).startswith(str(tmp)):
            raise  # about some other file (e.g. an input): not a write error of ours
        raise write_error(exc, final) from exc
    except BaseException:
        _remove(tmp)
        raise
    try:
        publish(tmp, final, overwrite)
    except FileExistsError:
        raise  # someone else created `final` meanwhile: the result stays at `tmp` (see message)
    except OSError as exc:
        _remove(tmp)
        raise write_error(exc, final) from exc


def remove_partial(path: Path) -> None:
    """Remove a temporary file or folder made by these helpers (errors ignored)."""
    _remove(path)
