"""Intensity normalisation, estimated once per stack so that frames do not flicker.

`percentile_range` looks at a sample of evenly spaced frames (and a regular
subsample of their pixels) to find one display range for the whole video;
`normalize_frame` maps any frame into [0, 1] with that same range.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np


def _frame_indices(n_frames: int, max_frames: int) -> np.ndarray:
    k = max(1, min(int(max_frames), n_frames))
    return np.unique(np.linspace(0, n_frames - 1, k).round().astype(int))


def _check_finite(values: np.ndarray, frame_index: int | None) -> None:
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        what = "NaN" if np.isnan(values).any() else "infinite values"
        where = f"frame {frame_index}" if frame_index is not None else "the frame"
        raise ValueError(f"{where} contains {what}; replace them first "
                         "(e.g. np.nan_to_num(frame, nan=background)) before segmenting")


def percentile_range(data, low: float = 0.5, high: float = 99.5, max_frames: int = 16,
                     max_samples: int = 4_000_000) -> tuple[float, float]:
    """Intensity range (lo, hi) for a whole video, from percentiles of a sample.

    The range is estimated once per stack, not per frame, so that normalised
    frames keep their relative brightness (no flicker).

    Parameters
    ----------
    data : numpy or dask array, (T, Y, X) or (Y, X)
        The video (or one image). Extra leading axes are treated like T.
        A `napari_sam2.io.Stack` is accepted too (its ``data`` is used).
    low, high : float
        Percentiles in [0, 100], ``low < high``.
    max_frames : int
        At most this many evenly spaced frames are read (first and last included).
    max_samples : int
        At most about this many pixels in total are used; each sampled frame is
        subsampled on a regular grid to stay within it.

    Returns
    -------
    lo, hi : float
        The `low` and `high` percentiles; ``hi >= lo``.

    Raises
    ------
    ValueError
        If the percentiles are invalid or a sampled frame contains NaN/inf
        (the message names the frame).
    """
    if hasattr(data, "axes") and isinstance(getattr(data, "data", None), da.Array):
        data = data.data  # a Stack
    elif not isinstance(data, (np.ndarray, da.Array)):
        data = np.asarray(data)
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    if data.ndim < 2:
        raise ValueError(f"expected an image (Y, X) or a video (T, Y, X), got shape {data.shape}")
    if data.ndim == 2:
        data = data[None]
    elif data.ndim > 3:
        data = data.reshape((-1,) + tuple(data.shape[-2:]))
    n, height, width = (int(s) for s in data.shape)
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"cannot compute a range for an empty array of shape {data.shape}")
    indices = _frame_indices(n, max_frames)
    per_frame = max(1, int(max_samples) // len(indices))
    step = max(1, math.ceil(math.sqrt(height * width / per_frame)))
    # shift the sampling grid from frame to frame, so that together the sampled
    # frames cover different pixels rather than the same grid again and again
    parts = [data[int(i), (k % step)::step, ((k // step) % step)::step]
             for k, i in enumerate(indices)]
    if isinstance(data, da.Array):
        parts = dask.compute(*parts)
    parts = [np.asarray(p).ravel() for p in parts]
    if parts[0].dtype.kind in "fc":
        for i, part in zip(indices, parts):
            _check_finite(part, int(i))
    lo, hi = np.percentile(np.concatenate(parts), [low, high])
    return float(lo), float(max(hi, lo))


def normalize_frame(frame, lo: float, hi: float, index: int | None = None) -> np.ndarray:
    """Map a frame into [0, 1] with a fixed range, as float32.

    Parameters
    ----------
    frame : array-like, (Y, X) or any shape
        Pixels (a dask array is computed).
    lo, hi : float
        Range from `percentile_range`: `lo` maps to 0, `hi` to 1, values
        outside are clipped. If ``hi <= lo`` (a constant image) pixels above
        `lo` become 1 and the rest 0, instead of dividing by zero.
    index : int, optional
        Frame number, used in error messages.

    Returns
    -------
    numpy.ndarray
        float32, same shape as `frame`, values in [0, 1].

    Raises
    ------
    ValueError
        If the frame contains NaN or infinite values.
    """
    frame = np.asarray(frame)
    _check_finite(frame, index)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"normalisation range must be finite, got lo={lo}, hi={hi}")
    if hi <= lo:
        return (frame > lo).astype(np.float32)
    out = frame.astype(np.float32, copy=True)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out
