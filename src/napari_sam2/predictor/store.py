"""Per-object storage of tracked frames: a small window in RAM, the rest on disk (or dropped).

What one tracked frame leaves behind per object: its memory (64 x 64 x 64 bf16, 512 KiB), its low-res
mask logits (256 x 256 fp32, 256 KiB, fed back with correction clicks), its object pointer and score.
A step only reads the 6 frames before it (memories) and 15 (pointers), so only a window of recent
frames stays in RAM; older frames are spilled to disk so that a later re-propagation or a correction
click on any frame sees exactly what the official predictor would see.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict

import numpy as np
import torch

from ..io.owner import TAG_PATTERN, owner_tag, remove_stale

ENTRY_KEYS = ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits")


class FrameStore:
    """Mapping frame index -> entry (dict of tensors, batch of 1) for one object.

    Parameters
    ----------
    num_frames
        Length of the video (the index of which frames exist is a bitmap, 1 byte per frame).
    ram_frames
        How many entries stay in RAM; at least the 16 a tracking step reads.
    spill_dir
        Folder for entries evicted from RAM; ``None`` drops them (RAM-only mode: re-propagation
        recomputes instead, and correction clicks on old frames start from no previous mask).
    device
        Where the window's entries live (the model's: a GPU's steps read them there, with no copy per
        step); an entry read back from disk goes there. Default: where each entry was given.
    """

    def __init__(self, num_frames: int, ram_frames: int = 16, spill_dir: str | None = None,
                 device: torch.device | str | None = None):
        self._ram: OrderedDict[int, dict] = OrderedDict()
        self._has = np.zeros(num_frames, dtype=bool)
        # what each entry was computed from (a key of its step's inputs; 0: unknown, e.g. a prompt's)
        self._version = np.zeros(num_frames, dtype=np.int64)
        self._on_disk = np.zeros(num_frames, dtype=bool)
        self.ram_frames = max(ram_frames, 1)
        self.spill_dir = spill_dir
        self.device = None if device is None else torch.device(device)
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)

    def __contains__(self, t: int) -> bool:
        return 0 <= t < len(self._has) and bool(self._has[t])

    def __len__(self) -> int:
        return int(self._has.sum())

    def frames(self) -> list[int]:
        return np.flatnonzero(self._has).tolist()

    def has_mask(self, frames) -> tuple[bool, ...]:
        """Which of ``frames`` (possibly out of range) hold an entry: the bank layout of a step."""
        n = len(self._has)
        return tuple(bool(0 <= t < n and self._has[t]) for t in frames)

    def version(self, t: int) -> int:
        """The inputs key frame t's entry was stored with (see :meth:`put`); 0 if none or unknown."""
        return int(self._version[t]) if t in self else 0

    def _path(self, t: int) -> str:
        return os.path.join(self.spill_dir, f"{t:07d}.pt")

    def __setitem__(self, t: int, entry: dict) -> None:
        self.put(t, entry)

    def put(self, t: int, entry: dict, version: int = 0) -> None:
        """Store frame t's entry with the key of what it was computed from (0: unknown)."""
        self._version[t] = version
        self._ram[t] = {k: entry[k] for k in ENTRY_KEYS}
        self._ram.move_to_end(t)
        self._has[t] = True
        if self._on_disk[t]:
            # the copy on disk is stale now
            os.remove(self._path(t))
            self._on_disk[t] = False
        self._evict()

    def get(self, t: int, default=None):
        if t not in self:
            return default
        if t in self._ram:
            self._ram.move_to_end(t)
            return self._ram[t]
        if not self._on_disk[t]:
            return default
        entry = torch.load(self._path(t), map_location=self.device or "cpu", weights_only=True)
        self._ram[t] = entry
        self._evict(keep=t)
        return entry

    def __getitem__(self, t: int) -> dict:
        entry = self.get(t)
        if entry is None:
            raise KeyError(t)
        return entry

    def pop(self, t: int, default=None):
        entry = self.get(t, default)
        self.discard(t)
        return entry

    def discard(self, t: int) -> None:
        """Forget frame t without reading it back from disk."""
        if t in self:
            self._ram.pop(t, None)
            self._has[t] = False
            if self._on_disk[t]:
                os.remove(self._path(t))
                self._on_disk[t] = False

    def clear(self) -> None:
        for t in self.frames():
            self.discard(t)

    def release(self) -> None:
        """Empty the RAM window: entries go to disk (or are dropped without a spill folder), for an object
        that will not be tracked again soon (an ended track)."""
        window, self.ram_frames = self.ram_frames, 0
        try:
            self._evict()
        finally:
            self.ram_frames = window

    def _evict(self, keep: int | None = None) -> None:
        while len(self._ram) > max(self.ram_frames, 0 if keep is None else 1):
            t, entry = next(iter(self._ram.items()))
            if t == keep:
                self._ram.move_to_end(t)
                continue
            del self._ram[t]
            if self.spill_dir is None:
                self._has[t] = False
            elif not self._on_disk[t]:  # an entry read back from disk is still there unchanged
                try:
                    torch.save(entry, self._path(t))
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"could not spill tracked frame {t} to {self.spill_dir} ({e.strerror}): free disk space, "
                        "pass spill_dir= on a larger disk, or use history='ram'",
                    ) from e
                self._on_disk[t] = True


SPILL_PREFIX = "napari-sam2-spill-"
_SPILL_NAME = re.escape(SPILL_PREFIX) + TAG_PATTERN + r"-.+"


def remove_stale_spill_dirs(parent: str | None = None) -> None:
    """Remove the spill folders that dead processes of this machine left in ``parent`` (the temp folder)."""
    remove_stale(parent or tempfile.gettempdir(), _SPILL_NAME)


class SpillDir:
    """A temporary folder for spilled frames, removed when its owner goes away (its session is closed or
    collected, or the interpreter exits, Ctrl-C and the CLI's SIGTERM included). Its name carries the
    owner process (``napari-sam2-spill-PID@HOST-XXXX``), so that folders left by killed processes are
    removed when the next one starts."""

    def __init__(self, parent: str | None = None):
        parent = parent or tempfile.gettempdir()
        remove_stale_spill_dirs(parent)
        self.path = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{owner_tag()}-", dir=parent)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def sub(self, name: str) -> str:
        return os.path.join(self.path, name)

    def cleanup(self) -> None:
        self._finalizer()
