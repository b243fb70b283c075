"""The files of one result (labels + tracks), published together with a manifest written last.

A result is written in a hidden working folder next to its outputs
(``OUT/.NAME.partial-PID@HOST-XXXXXXXX/``), then its files are renamed into place one by one and
``OUT/NAME.manifest.json`` is written last. The manifest names the run, the input, and a fingerprint
(size and time stamp; for a folder, of every file in it) of each published file and of the input. A
result is *complete* only when its manifest exists, every file it names is on disk unchanged, and it
was made from the same input (unchanged since) with the same settings: labels of one run beside
tracks of another, a half-replaced result, or the result of an edited input is never taken for a
finished one. Fingerprints survive ``cp -a``, ``rsync -a`` and moves (no inode numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .atomic import atomic_path, remove_partial, temporary_sibling, write_error
from .lock import OutputLock

__all__ = ["MANIFEST_SUFFIX", "manifest_path", "fingerprint", "check_complete", "PendingResult"]

MANIFEST_SUFFIX = ".manifest.json"
_FORMAT = "napari-sam2 result 1"


def manifest_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}{MANIFEST_SUFFIX}"


def fingerprint(path: str | os.PathLike) -> list:
    """What identifies a file's version on disk without reading it: ``[size, mtime_ns]``; for a folder
    a digest of the (path, size, mtime_ns) of every file under it."""
    path = Path(path)
    st = path.stat()
    if not path.is_dir():
        return [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha1()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            fst = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{fst.st_size}\0{fst.st_mtime_ns}\n".encode())
    return ["dir", digest.hexdigest()]


def check_complete(out_dir: str | os.PathLike, name: str, finals: dict[str, Path], source: str,
                   settings: dict | None = None) -> str | None:
    """None when ``OUT/NAME`` is a complete result of ``source`` (unchanged since) holding ``finals``,
    made with ``settings`` (compared when given); else why not."""
    manifest = manifest_path(out_dir, name)
    if not manifest.is_file():
        return f"no {manifest.name}: the run that wrote it did not finish"
    try:
        record = json.loads(manifest.read_text())
        files = record["files"]
        recorded_input = record["input"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest.name} is unreadable"
    if os.path.realpath(recorded_input) != os.path.realpath(source):
        return f"it is the result of another input, '{recorded_input}'"
    try:
        if record.get("input_fingerprint") != fingerprint(source):
            return f"the input '{source}' was changed after the result was made"
    except OSError:
        pass  # an input that cannot be read fails on its own, with its own message
    for key, value in (settings or {}).items():
        if record.get("settings", {}).get(key) != value:
            return f"it was made with other settings ({key}: {record.get('settings', {}).get(key)!r}, now {value!r})"
    for key, final in finals.items():
        entry = files.get(key)
        if entry is None or entry.get("path") != final.name:
            return f"{manifest.name} does not list {final.name}"
        if not (final.exists() or final.is_symlink()):
            return f"{final.name} is missing"
        if fingerprint(final) != entry.get("fingerprint"):
            return f"{final.name} was changed after {manifest.name} was written (by another run?)"
    return None


class PendingResult:
    """A hidden working folder in ``out_dir`` for the files ``finals`` (key -> final path).

    Write each file at :meth:`path` ``(key)``, then :meth:`publish`; :meth:`discard` (or any
    exception) leaves the outputs as they were.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, finals: dict[str, Path]):
        self.out_dir = Path(out_dir)
        self.name = name
        self.finals = dict(finals)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.work = temporary_sibling(self.out_dir / name)
            self.work.mkdir()
        except OSError as exc:
            raise write_error(exc, next(iter(self.finals.values()))) from exc

    def path(self, key: str) -> Path:
        """Where to write the file that becomes ``finals[key]``."""
        return self.work / self.finals[key].name

    def scratch(self, name: str) -> Path:
        """A path for an intermediate file, removed with the working folder."""
        return self.work / f".{name}"

    def final_for(self, written: str | os.PathLike | None) -> Path:
        """The output a path inside the working folder stands for (for error messages)."""
        try:
            first = Path(written).resolve().relative_to(self.work.resolve()).parts[0]
        except (TypeError, ValueError, IndexError):
            first = ""
        for final in self.finals.values():
            if final.name == first:
                return final
        return next(iter(self.finals.values()))

    def owns(self, written: str | os.PathLike | None) -> bool:
        if not written:
            return False
        try:
            Path(written).resolve().relative_to(self.work.resolve())
        except ValueError:
            return False
        return True

    def publish(self, overwrite: bool, record: dict) -> None:
        """Move every file into place, replacing earlier ones when ``overwrite``, then write the
        manifest (``record`` plus the files' fingerprints). Under the result's lock, so that two runs
        publishing the same name cannot interleave their files."""
        with OutputLock(self.out_dir / f".{self.name}.lock", wait=60,
                        what=f"result '{self.name}' in '{self.out_dir}'"):
            manifest = manifest_path(self.out_dir, self.name)
            replaced: list[tuple[Path, Path]] = []  # (final, the earlier file moved aside)
            moved: list[Path] = []
            try:
                for key, final in self.finals.items():
                    if final.exists() or final.is_symlink():
                        if not overwrite:
                            raise FileExistsError(f"'{final}' appeared while this run was writing; nothing was "
                                                  "replaced. Use --overwrite to replace it.")
                        aside = self.work / f".old-{final.name}"
                        os.replace(final, aside)
                        replaced.append((final, aside))
                    os.replace(self.path(key), final)
                    moved.append(final)
                files = {key: {"path": final.name, "fingerprint": fingerprint(final)}
                         for key, final in self.finals.items()}
                body = {"format": _FORMAT, **record, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": files}
                with atomic_path(manifest, overwrite=True) as tmp:
                    tmp.write_text(json.dumps(body, indent=1, default=str))
            except BaseException:
                # put back what was there: an earlier complete result stays complete
                for final in moved:
                    remove_partial(final)
                for final, aside in replaced:
                    try:
                        os.replace(aside, final)
                    except OSError:
                        pass
                raise
        self.discard()

    def discard(self) -> None:
        remove_partial(self.work)

