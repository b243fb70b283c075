"""Frames and prompts -> network input: the one home of pre-processing.

Images, in two steps:

1. :func:`to_unit_rgb` turns any 2-D or RGB image into a float32 ``H x W x 3`` array in [0, 1].
   uint8 is divided by 255 (what ``torchvision.transforms.ToTensor`` does in the official
   predictor); every other dtype (uint16 and other integers, floats) is scaled with its
   0.5 / 99.5 percentiles (or a fixed ``intensity_range``, one per stack for videos) and clipped;
   grey is replicated to three channels.
2. :func:`to_model_input` resizes to the network's square input (bilinear, half-pixel centres,
   antialiased: what the official ``torchvision.transforms.Resize`` does on a float tensor) and
   normalises with the ImageNet mean / std. :func:`reference_model_input` is the official video
   loader's path for 8-bit frames (PIL resize, x / 255), kept for exact comparisons.

For uint8 RGB this reproduces the official ``SAM2Transforms`` bit for bit (up to the float
rounding of the same operations).

Prompts: :func:`to_model_coords` scales (x, y) points and box corners from frame pixels to the
network's input pixels (both predictors); :func:`mask_to_model_input` resizes a mask prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..io.normalize import normalize_frame
from ..modeling.common import interpolate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PERCENTILES = (0.5, 99.5)


def check_image(image) -> np.ndarray:
    """``image`` as a numpy array of shape ``H x W`` or ``H x W x C`` (C in 1, 3, 4), checked.

    A 4th (alpha) channel is dropped, a single channel is squeezed. Raises ``ValueError`` for
    other shapes, empty images, complex data and NaN / inf in float data, ``TypeError`` for
    non-numeric data.
    """
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"image must be a numeric array (uint8, uint16, float, ...), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]  # RGBA (e.g. a screenshot): ignore alpha
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"image must be 2-D (H x W, grey) or H x W x 3 (RGB), got an array of shape {arr.shape}. "
            "For a stack or a video, pass one frame (e.g. stack[t])."
        )
    if arr.ndim == 3 and arr.shape[-1] != 3:
        raise ValueError(
            f"image must be H x W (grey) or H x W x 3 (RGB, channels last), got shape {arr.shape}. "
            "Channels-first data: use np.moveaxis(image, 0, -1)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        what = "NaN" if np.isnan(arr).any() else "infinite values"
        raise ValueError(
            f"image contains {what}; replace them first (e.g. np.nan_to_num(image, nan=background))"
        )
    return arr


def intensity_percentiles(image: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """The ``percentiles`` (default 0.5 and 99.5) of all pixels (all channels together)."""
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(percentiles)}")
    lo, hi = np.percentile(image, [lo_p, hi_p])
    return float(lo), float(hi)


def to_unit_rgb(
    image,
    intensity_range: tuple[float, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Any grey / RGB image -> float32 ``H x W x 3`` (C-contiguous) in [0, 1].

    Parameters
    ----------
    image
        ``H x W`` or ``H x W x 3`` array of any numeric dtype (see :func:`check_image`).
    intensity_range
        ``(low, high)``: map ``low`` to 0 and ``high`` to 1 (clipped), for any dtype. Use one range
        for all frames of a stack so that they are normalised alike. ``None``: uint8 and bool are
        divided by 255 / taken as 0-1 as they are; other dtypes use ``percentiles``.
    percentiles
        Percentiles of the image giving the range when ``intensity_range`` is None (default 0.5 and
        99.5: robust to a few hot pixels).
    """
    arr = check_image(image)
    if intensity_range is not None:
        lo, hi = (float(v) for v in intensity_range)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(f"intensity_range must be finite (low, high) with low <= high, got {intensity_range}")
        unit = normalize_frame(arr, lo, hi)
    elif arr.dtype == np.uint8:
        # exactly torchvision's ToTensor: float32 division by 255
        unit = (torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32) / 255.0).numpy()
    elif arr.dtype == np.bool_:
        unit = arr.astype(np.float32)
    else:
        lo, hi = intensity_percentiles(arr, percentiles)
        unit = normalize_frame(arr, lo, hi)
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=-1)
    return np.ascontiguousarray(unit, dtype=np.float32)


def to_model_input(unit_rgb: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``H x W x 3`` (or grey ``H x W``, replicated after the resize) in [0, 1] ->
    ``1 x 3 x size x size`` network input.

    Bilinear resize with half-pixel centres and antialiasing (torchvision ``Resize`` on a float
    tensor: ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)``; skipped
    when the image already has that size, as torchvision does), then ImageNet mean / std.
    """
    x = torch.from_numpy(np.ascontiguousarray(unit_rgb, dtype=np.float32))
    x = (x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()).to(device)
    if tuple(x.shape[-2:]) != (size, size):
        x = interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return ((x - mean) / std)[None]


def reference_model_input(frame: np.ndarray, size: int) -> torch.Tensor:
    """8-bit grey or RGB ``frame`` -> ``3 x size x size``, exactly as the official video loader: PIL's
    default resize of the RGB image, x / 255, ImageNet mean / std."""
    from PIL import Image

    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    img = np.array(Image.fromarray(frame).convert("RGB").resize((size, size)))
    x = torch.from_numpy(img / 255.0).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def to_model_coords(xy: torch.Tensor, hw: tuple[float, float], size: int) -> torch.Tensor:
    """``... x 2`` (x, y) in a frame of ``hw = (height, width)`` pixels -> network input pixels
    (``size x size``). ``hw = (1, 1)``: the coordinates are already normalised to [0, 1]."""
    h, w = hw
    return xy / torch.tensor([w, h], dtype=xy.dtype, device=xy.device) * size


def mask_to_model_input(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A binary ``1 x 1 x H x W`` float mask prompt -> ``1 x 1 x size x size`` binary float (antialiased
    bilinear resize, then >= 0.5), as the official video predictor does."""
    if tuple(mask.shape[-2:]) == (size, size):
        return mask
    resized = interpolate(mask, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (resized >= 0.5).float()
