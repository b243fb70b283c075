"""Frames for the network, read lazily from any stack and normalised once per stack."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ..io import normalize_frame, open_stack, percentile_range, video_view
from ..io.stack import Stack
from .preprocess import reference_model_input, to_model_input


class FrameSource:
    """Frames of a video, prepared for the network one at a time.

    Parameters
    ----------
    video
        numpy / dask / zarr array, a path (TIFF, Zarr, folder of frames) or a
        :class:`napari_sam2.io.Stack`. Axes ``(T, Y, X)``, ``(T, Y, X, C)`` or others named by ``axes``.
    normalize
        ``"percentile"`` (default): intensities scaled by the 0.5 / 99.5 percentiles estimated once over
        a sample of the stack (no flicker); ``"reference"``: 8-bit RGB preprocessed exactly like the
        official SAM2 video predictor (bicubic resize, x / 255); a ``(lo, hi)`` pair: a fixed range.
        Every mode ends with ImageNet mean/std.
    """

    def __init__(
        self,
        video: Any,
        image_size: int = 1024,
        *,
        axes: str | None = None,
        channel: int | None = None,
        normalize: str | tuple[float, float] = "percentile",
        percentiles: tuple[float, float] = (0.5, 99.5),
    ):
        stack = video if isinstance(video, Stack) else open_stack(video, axes=axes)
        self.stack = video_view(stack, channel=channel)
        self.rgb = self.stack.axes == "TYXC"
        self.data = self.stack.data
        shape = self.data.shape
        if shape[0] == 0:
            raise ValueError("the video has 0 frames: nothing to segment.")
        self.num_frames = int(shape[0])
        self.height, self.width = int(shape[1]), int(shape[2])
        if self.height == 0 or self.width == 0:
            raise ValueError(f"the video's frames are empty (shape {tuple(shape)}).")
        self.image_size = image_size
        self.normalize = normalize
        self._read_lock = threading.Lock()
        if isinstance(normalize, str) and normalize == "reference":
            if self.data.dtype != np.uint8:
                raise ValueError(
                    f"normalize='reference' reproduces the official preprocessing of 8-bit RGB frames; this video is "
                    f"{self.data.dtype}. Use normalize='percentile' (default) or a (lo, hi) range."
                )
            self.range = (0.0, 255.0)
        elif isinstance(normalize, str) and normalize == "percentile":
            sample = self.data
            if self.rgb:
                # one range for the three channels: lay them side by side as one grey frame
                t, y, x, c = sample.shape
                sample = sample.transpose(0, 1, 3, 2).reshape(t, y, c * x)
            self.range = percentile_range(sample, *percentiles)
        elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
            self.range = (float(normalize[0]), float(normalize[1]))
        else:
            raise ValueError(f"normalize must be 'percentile', 'reference' or a (lo, hi) pair, got {normalize!r}.")

    def __len__(self) -> int:
        return self.num_frames

    def raw(self, t: int, scheduler: str | None = None) -> np.ndarray:
        """Frame ``t`` as stored, (Y, X) or (Y, X, 3); ``scheduler``: the dask scheduler for a lazy frame."""
        self.check_index(t)
        with self._read_lock:  # the next frame is read in a background thread while this one is tracked
            frame = self.data[t]
            if hasattr(frame, "compute"):
                frame = frame.compute(scheduler=scheduler) if scheduler else frame.compute()
            return np.asarray(frame)

    def check_index(self, t: int) -> None:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise TypeError(f"frame index must be an integer, got {t!r}")
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame index {t} is out of range: the video has {self.num_frames} frames (0..{self.num_frames - 1}).")

    def __getitem__(self, t: int) -> torch.Tensor:
        """Frame ``t`` as a 3 x S x S float32 tensor, normalised for the network."""
        return self.model_input(self.raw(t), t)

    def model_input(self, frame: np.ndarray, t: int) -> torch.Tensor:
        """A frame as read (:meth:`raw`) -> 3 x S x S float32, normalised for the network."""
        if isinstance(self.normalize, str) and self.normalize == "reference":
            return reference_model_input(frame, self.image_size)
        lo, hi = self.range
        return to_model_input(normalize_frame(frame, lo, hi, index=t), self.image_size)[0]

    def settings(self) -> dict:
        """What besides the pixels decides the network's input (part of a cached feature's key)."""
        mode = self.normalize if isinstance(self.normalize, str) else "range"
        return {"normalize": mode, "range": [float(v) for v in self.range], "image_size": self.image_size, "rgb": self.rgb}
