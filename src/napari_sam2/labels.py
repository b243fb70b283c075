"""Mask logits -> label frames, and where label frames go as they are made (the label sinks).

The last step of the data path before the writers: per frame, the objects' mask logits become one
``(H, W)`` label image (label = object id, no overlap), which a sink stores: an in-memory array, a
caller's array-like (a napari Labels layer's data, a zarr array), or an OME-Zarr store on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import ZarrLabelsWriter

__all__ = ["LABEL_DTYPE", "ArraySink", "logits_to_labels", "open_label_sink"]

LABEL_DTYPE = np.uint32


def logits_to_labels(mask_logits, obj_ids) -> np.ndarray:
    """``N x 1 x H x W`` (or ``N x H x W``) mask logits -> ``(H, W)`` uint32 labels.

    Each pixel gets the object with the highest positive logit (no overlap); its label is the
    object's id. Pixels where no logit is positive are 0.
    """
    import torch

    logits = torch.as_tensor(mask_logits)
    if logits.ndim == 4:
        logits = logits[:, 0]
    if logits.ndim != 3:
        raise ValueError(f"mask logits must be N x 1 x H x W, got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if n == 0:
        return np.zeros(tuple(logits.shape[-2:]), dtype=LABEL_DTYPE)
    if len(obj_ids) != n:
        raise ValueError(f"got {n} masks but {len(obj_ids)} object ids: give one id per mask.")
    # the winner is chosen where the logits are (a GPU): only H x W small slots travel to the host
    best, index = logits.float().max(dim=0)  # H x W
    slot = torch.where(best > 0, index + 1, 0).to(torch.int16 if n < 2**15 - 1 else torch.int32)
    lut = np.concatenate([[0], np.asarray(obj_ids, dtype=np.int64)]).astype(LABEL_DTYPE)  # slot -> label
    return lut[slot.cpu().numpy()]


class ArraySink:
    """Write frames into an array-like (numpy, zarr, a napari Labels layer's data)."""

    def __init__(self, array):
        self.array = array

    def write(self, t: int, frame: np.ndarray) -> None:
        self.array[t] = frame

    def close(self):
        return None

    def abort(self) -> None:
        pass


def open_label_sink(out: Any, shape: tuple[int, int, int], overwrite: bool = False):
    """``(sink, path)`` for label frames of a ``(T, Y, X)`` video.

    ``out``: ``None`` (a new in-memory array), a path (an OME-Zarr store written frame by frame,
    appearing under its name only when complete; ``path`` is that path) or a ``(T, Y, X)`` array-like
    filled in place.
    """
    if out is None:
        return ArraySink(np.zeros(shape, dtype=LABEL_DTYPE)), None
    if isinstance(out, (str, os.PathLike)):
        path = Path(out).expanduser()
        return ZarrLabelsWriter(path, shape, dtype=LABEL_DTYPE, overwrite=overwrite), path
    if hasattr(out, "shape") and hasattr(out, "__setitem__"):
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out has shape {tuple(out.shape)} but the labels are {shape} (T, Y, X)")
        return ArraySink(out), None
    raise TypeError(f"out must be None, a path (an OME-Zarr store is written there) or a (T, Y, X) array, "
                    f"got {type(out).__name__}")
