"""Label frames as they stream in: iterate a (T, Y, X) source, check and convert each frame."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np


def iter_frames(labels, n_frames: int | None = None) -> tuple[Iterator[np.ndarray], int | None]:
    """Iterate the (Y, X) frames of a label video without loading it whole.

    Parameters
    ----------
    labels : array (T, Y, X) or iterable of (Y, X) frames
        numpy, dask and zarr arrays are read one frame at a time; a generator
        is consumed as it yields.
    n_frames : int, optional
        Number of frames, for iterables that have no ``len``.

    Returns
    -------
    frames : iterator of numpy.ndarray
    n_frames : int or None
        The number of frames when it can be known in advance.
    """
    if hasattr(labels, "shape") and hasattr(labels, "ndim") and hasattr(labels, "__getitem__"):
        if labels.ndim != 3:
            raise ValueError(f"label video must have shape (T, Y, X), got {tuple(labels.shape)}; "
                             "add a leading axis for a single frame (labels[None])")
        count = int(labels.shape[0])
        return (np.asarray(labels[t]) for t in range(count)), count
    if n_frames is None and hasattr(labels, "__len__"):
        n_frames = len(labels)
    return (np.asarray(f) for f in labels), n_frames


def peek(frames: Iterator[np.ndarray]) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """First frame of an iterator, and an iterator that still yields it."""
    try:
        first = next(frames)
    except StopIteration:
        raise ValueError("no frames to write: the label frames were empty") from None
    return first, itertools.chain([first], frames)


def labels_for_dtype(frame, dtype, where: str, hint: str = "") -> np.ndarray:
    """Return `frame` as integer labels of `dtype`, refusing values that would not survive.

    Parameters
    ----------
    frame : array-like, (Y, X)
        Labels: integers, booleans, or floats holding whole numbers.
    dtype : numpy dtype
        Target integer dtype (e.g. uint16 for CTC, uint32 for zarr).
    where : str
        How to name the frame in errors (e.g. ``"frame 12"``).
    hint : str
        Extra advice appended to range errors.

    Raises
    ------
    ValueError
        If values are negative, exceed the dtype's range, or are not whole numbers.
    """
    frame = np.asarray(frame)
    dtype = np.dtype(dtype)
    if frame.dtype == dtype:
        return frame
    if frame.dtype == bool:
        return frame.astype(dtype)
    if frame.dtype.kind == "f":
        if not np.all(np.isfinite(frame)) or np.any(frame != np.round(frame)):
            raise ValueError(f"{where}: label values must be whole numbers, got dtype {frame.dtype} "
                             "with fractional or NaN values")
    elif frame.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, got dtype {frame.dtype}")
    if frame.size:
        lo, hi = frame.min(), frame.max()
        info = np.iinfo(dtype)
        if lo < 0 or hi > info.max:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: label {bad} does not fit {dtype} (0..{info.max})"
                             + (f"; {hint}" if hint else ""))
    return frame.astype(dtype)
