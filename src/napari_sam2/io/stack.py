"""The `Stack` container returned by every reader, and the reader errors.

A `Stack` is a lazy dask array plus the names of its axes. Axes are letters
from ``"TZCYX"`` and are always stored in that canonical order (a subsequence
of it, e.g. ``"TYX"``, ``"TCYX"``, ``"TZCYX"``), whatever the order was in the
file: readers transpose lazily on the way in.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

#: The axis letters a `Stack` may carry, in their canonical order.
CANONICAL_AXES = "TZCYX"


class StackReadError(ValueError):
    """An image source could not be read (corrupt, truncated, inconsistent or unsupported)."""


_NUMERIC_HINT = ("pass integer (uint8, uint16, int32, ...) or floating-point (float32, float64) "
                 "intensities")


def check_pixel_dtype(dtype, where: str | None = None) -> None:
    """Refuse pixels that are not intensities: bool, complex, object, strings, dates, records.

    Parameters
    ----------
    dtype : numpy dtype
        The dtype of the pixels.
    where : str, optional
        The source for the message, e.g. ``"TIFF file '/x/m.tif'"``; None for an in-memory array.

    Raises
    ------
    StackReadError
        (a `ValueError`) unless `dtype` is an integer or floating-point dtype.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf":
        return
    name = "bool" if dtype.kind == "b" else str(dtype)
    if where is None:
        head = f"cannot segment an array of dtype {name}"
    else:
        head = f"cannot segment {where}: its pixels have dtype {name}"
    if dtype.kind == "b":
        tail = (f"{_NUMERIC_HINT}; for a mask use it as a prompt (masks=; CLI: --prompts MASK.tif) "
                "instead")
    elif dtype.kind == "c":
        tail = (f"{_NUMERIC_HINT}; take the magnitude first, e.g. np.abs(stack)"
                + ("" if where is None else ", and save that"))
    else:
        tail = (f"{_NUMERIC_HINT}; convert the data to numbers first, e.g. "
                "np.asarray(stack, dtype=np.float32)" + ("" if where is None else ", and save that"))
    raise StackReadError(f"{head}: {tail}")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe/FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a file or folder"


def non_regular_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder, else None.

    Symlinks are followed (a link to a regular file is fine); nothing is opened, so a
    named pipe cannot block the caller.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the caller's own checks say so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _file_kind(mode)


def check_regular_file(path: str | os.PathLike, what: str = "input") -> None:
    """Raise `StackReadError` if `path` exists and is a named pipe, socket or device.

    Opening a FIFO blocks until something writes to it, so image readers must refuse it
    before opening anything.
    """
    kind = non_regular_kind(path)
    if kind is not None:
        raise StackReadError(
            f"{what} '{path}' is not a regular file (it is {kind}): pass an image file, "
            "a folder of frames or a Zarr store"
        )


@dataclass
class Stack:
    """A lazily loaded image stack with named axes.

    Attributes
    ----------
    data : dask.array.Array
        The pixels, never loaded eagerly. Shape matches `axes`, e.g. (T, Y, X)
        for ``axes == "TYX"`` or (T, Z, C, Y, X) for ``"TZCYX"``.
    axes : str
        One letter per dimension of `data`, a subsequence of ``"TZCYX"`` in
        that order. ``Y`` and ``X`` are always present.
    path : pathlib.Path or None
        Where the pixels come from, or None for in-memory arrays.
    metadata : dict
        What the reader learned besides the pixels. Common keys:
        ``"format"`` (e.g. ``"ome-tiff"``, ``"ome-zarr-0.4"``, ``"frames"``),
        ``"physical_pixel_sizes"`` (dict axis letter -> size, e.g.
        ``{"Z": 1.0, "Y": 0.2, "X": 0.2}``), ``"units"``, ``"time_interval"``,
        ``"source_axes"`` (the axes as the file named them),
        ``"axes_guessed"`` (True when no metadata said what the axes were),
        ``"video_axis"`` (set by `select`: which original axis is the video).
    """

    data: da.Array
    axes: str
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, da.Array):
            raise TypeError(
                f"Stack.data must be a dask array, got {type(self.data).__name__}; "
                "use napari_sam2.io.open_stack(...) to wrap numpy or zarr arrays lazily"
            )
        if len(self.axes) != self.data.ndim:
            raise ValueError(
                f"Stack axes {self.axes!r} have {len(self.axes)} letters but the data "
                f"has {self.data.ndim} dimensions (shape {tuple(self.data.shape)})"
            )
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of `data`."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self):
        """dtype of `data`."""
        return self.data.dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions of `data`."""
        return self.data.ndim

    @property
    def sizes(self) -> dict[str, int]:
        """Size of each axis by letter, e.g. ``{"T": 50, "Y": 512, "X": 512}``."""
        return dict(zip(self.axes, self.shape))

    def size(self, axis: str) -> int:
        """Size of `axis` (a letter of ``"TZCYX"``); 1 when the stack has no such axis."""
        return self.sizes.get(axis.upper(), 1)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{a}={s}" for a, s in self.sizes.items())
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"Stack({self.axes}: {sizes}, dtype={self.dtype}{where})"
