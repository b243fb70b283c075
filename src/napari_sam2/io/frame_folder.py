"""Lazy reading of folders of per-frame images (``t000.tif``, ``t001.tif``, ... or PNG/JPEG).

The Cell Tracking Challenge layout (``01/t000.tif``, ``01_GT/TRA/man_track000.tif``,
result folders with ``mask000.tif``) is one case. Files are put in natural
order (``t2`` before ``t10``). Each frame is read by its own dask task when
computed; the first frame is read once at opening to learn the shape and dtype,
and every later frame must match it.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
from dask.base import tokenize

from .axes import guess_axes, map_tiff_axes, to_canonical, validate_axes
from .stack import Stack, StackReadError, non_regular_kind

FRAME_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: ``t2`` before ``t10``."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]


def _pattern(name: str) -> str:
    """Name with its digit runs replaced by ``#``: ``t012.tif`` -> ``t###.tif``."""
    return _DIGITS.sub(lambda m: "#" * len(m.group(1)), name)


def _family(name: str) -> str:
    """Name with each digit run replaced by one ``*`` (tolerates changing padding widths)."""
    return _DIGITS.sub("*", name.lower())


def list_frame_files(folder: Path) -> list[Path]:
    """The image files of `folder` that form one frame sequence, in natural order.

    Raises
    ------
    StackReadError
        If the folder holds no image files, or several different sequences
        (e.g. ``t###.tif`` and ``mask###.tif``): pass a glob such as
        ``"folder/t*.tif"`` to choose one; or if an image name is a named pipe,
        socket or device (it is never opened: reading a FIFO blocks forever).
    """
    files = []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in FRAME_SUFFIXES:
            continue
        kind = non_regular_kind(p)
        if kind is not None:
            raise _not_regular(p, kind)
        if p.is_file():
            files.append(p)
    if not files:
        raise StackReadError(
            f"folder '{folder}' contains no image frames (looked for "
            f"{', '.join(FRAME_SUFFIXES)}); point to the folder that holds the frames"
        )
    families: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        families[_family(p.name)].append(p)
    if len(families) > 1:
        listing = ", ".join(
            f"{_pattern(min(v, key=lambda p: natural_key(p.name)).name)} ({len(v)} files)"
            for v in sorted(families.values(), key=len, reverse=True)
        )
        raise StackReadError(
            f"folder '{folder}' holds several image sequences: {listing}; "
            f"choose one with a glob, e.g. open_stack('{folder / '<prefix>*.tif'}')"
        )
    return sorted(files, key=lambda p: natural_key(p.name))


def _not_regular(path: Path, kind: str) -> StackReadError:
    return StackReadError(
        f"frame '{path}' is not a regular file (it is {kind}); it was not opened (reading it "
        "could block forever): remove it from the folder or replace it with the image file"
    )


def read_image_file(path: Path) -> np.ndarray:
    """Read one whole image file (TIFF via tifffile, PNG/JPEG via imageio)."""
    kind = non_regular_kind(path)
    if kind is not None:
        raise _not_regular(path, kind)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise StackReadError(f"image file '{path}' is corrupt or truncated or not an image "
                             f"({type(exc).__name__}: {exc})") from exc


def _read_frame(path: str, shape: tuple, dtype: str) -> np.ndarray:
    frame = read_image_file(Path(path))
    if frame.shape != shape or frame.dtype != np.dtype(dtype):
        raise StackReadError(
            f"frame '{path}' has shape {frame.shape} and dtype {frame.dtype}, but the first "
            f"frame of the sequence has shape {shape} and dtype {np.dtype(dtype)}; "
            "all frames of a sequence must match: remove or fix this file"
        )
    return frame


def _frame_axes(first: Path, frame: np.ndarray) -> tuple[tuple | None, str]:
    """Axes of one frame: from tifffile for TIFF, guessed for the rest (YX or YXC)."""
    if first.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(first) as tif:
            series = tif.series[0]
            if tuple(series.shape) == frame.shape:
                index, axes = map_tiff_axes(series.axes.replace("Q", "Z").replace("I", "Z"),
                                            series.shape, f"'{first}'")
                return index, axes
    if frame.ndim == 2:
        return None, "YX"
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        return None, "YXC"
    guessed = guess_axes((1,) + frame.shape)[1:]
    return None, guessed


def read_frames(files: Sequence[Path], axes: str | None = None,
                source: Path | None = None) -> Stack:
    """Stack per-frame image files lazily along T.

    Parameters
    ----------
    files : sequence of path
        One file per time point, already in order.
    axes : str, optional
        Axes of the stacked result, starting with the frame axis, e.g.
        ``"TYX"`` or ``"TYXC"``. By default ``"T"`` + the axes of one frame
        (``YX``, ``YXC`` for RGB, or those stored in a TIFF frame).
    source : path, optional
        The folder (or glob) the files came from, stored as `Stack.path`.

    Returns
    -------
    Stack
        One dask task per frame; shape (T, ...) in canonical axis order.
    """
    files = [Path(f) for f in files]
    if not files:
        raise StackReadError(f"no image frames found at '{source}'")
    for f in files:  # a FIFO among the frames would hang the first read of it
        kind = non_regular_kind(f)
        if kind is not None:
            raise _not_regular(f, kind)
    first = read_image_file(files[0])
    shape, dtype = first.shape, first.dtype
    name = "frames-" + tokenize([str(f) for f in files], shape, dtype.str)
    reader = dask.delayed(_read_frame, pure=True)
    frames = [
        da.from_delayed(reader(str(f), shape, dtype.str, dask_key_name=f"{name}-read-{i}"),
                        shape=shape, dtype=dtype)
        for i, f in enumerate(files)
    ]
    data = da.stack(frames, axis=0)
    metadata = {"format": "frames", "files": [f.name for f in files]}
    if axes is not None:
        ours = validate_axes(axes, data.shape, f"the {len(files)} frames of '{source}'")
        metadata["axes_guessed"] = False
    else:
        index, frame_axes = _frame_axes(files[0], first)
        if index is not None and any(i == 0 for i in index):
            data = data[(slice(None),) + index]
        if "T" in frame_axes:  # frames that are themselves time series: nothing sensible to do
            raise StackReadError(f"frame '{files[0]}' already has a time axis ({frame_axes}); "
                                 "open the files one by one instead of as a frame folder")
        ours = validate_axes("T" + frame_axes, data.shape, f"frames of '{source}'")
        metadata["axes_guessed"] = ours not in ("TYX", "TYXC")
    data, ours = to_canonical(data, ours)
    return Stack(data=data, axes=ours, path=source, metadata=metadata)


def read_frame_folder(folder: str | os.PathLike, axes: str | None = None) -> Stack:
    """Open a folder of per-frame images as a lazy (T, ...) stack (see `list_frame_files`)."""
    folder = Path(folder)
    return read_frames(list_frame_files(folder), axes=axes, source=folder)
