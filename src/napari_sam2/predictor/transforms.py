"""Image preprocessing and mask post-processing shared by the image predictor and the mask generator.

Preprocessing, in two steps:

1. :func:`to_unit_rgb` turns any 2-D or RGB image into a float32 ``H x W x 3`` array in [0, 1].
   uint8 is divided by 255 (what ``torchvision.transforms.ToTensor`` does in the official
   predictor); every other dtype (uint16 and other integers, floats) is scaled with its
   0.5 / 99.5 percentiles (or a fixed ``intensity_range``) and clipped; grey is replicated to
   three channels.
2. :func:`to_model_input` resizes to the network's square input (bilinear, half-pixel centres,
   antialiased: what the official ``torchvision.transforms.Resize`` does on a float tensor) and
   normalises with the ImageNet mean / std.

For uint8 RGB this reproduces the official ``SAM2Transforms`` bit for bit (up to the float
rounding of the same operations).

Post-processing: :func:`fill_holes_and_sprinkles` (the official predictor's ``max_hole_area`` /
``max_sprinkle_area``, with scipy instead of the CUDA extension), :func:`remove_small_regions`
(hole / island removal on full-resolution binary masks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..io.normalize import normalize_frame
from .postprocess import component_areas

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PERCENTILES = (0.5, 99.5)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_image(image) -> np.ndarray:
    """``image`` as a numpy array of shape ``H x W`` or ``H x W x C`` (C in 1, 3, 4), checked.

    A 4th (alpha) channel is dropped, a single channel is squeezed. Raises ``ValueError`` for
    other shapes, empty images, complex data and NaN / inf in float data, ``TypeError`` for
    non-numeric data.
    """
    arr = np.asarray(image)
    if arr.dtype == object or not (arr.dtype.kind in "biuf"):
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
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return ((x - mean) / std)[None]


def upsample_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``B x C x h x w`` logits -> ``B x C x H x W`` (bilinear, half-pixel centres)."""
    return F.interpolate(masks.float(), size=tuple(int(v) for v in hw), mode="bilinear", align_corners=False)


def fill_holes_and_sprinkles(
    logits: torch.Tensor,
    mask_threshold: float = 0.0,
    max_hole_area: float = 0.0,
    max_sprinkle_area: float = 0.0,
) -> torch.Tensor:
    """The official predictor's clean-up of ``... x h x w`` mask logits (a new tensor).

    Background components (logit <= threshold, 8-connected, touching the border or not) of at most
    ``max_hole_area`` pixels become foreground (threshold + 10); foreground components of at most
    ``max_sprinkle_area`` pixels become background (threshold - 10). Both are found on the input
    logits. Areas are in pixels of ``logits`` (the 256 x 256 low-resolution masks in the predictor).
    """
    if not (max_hole_area > 0 or max_sprinkle_area > 0) or logits.numel() == 0:
        return logits
    shape = logits.shape
    flat = logits.detach().float().reshape(-1, *shape[-2:]).cpu().numpy()
    holes = np.zeros(flat.shape, dtype=bool)
    sprinkles = np.zeros(flat.shape, dtype=bool)
    for i, m in enumerate(flat):
        if max_hole_area > 0:
            labels, areas = component_areas(m <= mask_threshold)
            holes[i] = (labels > 0) & (areas <= max_hole_area)
        if max_sprinkle_area > 0:
            labels, areas = component_areas(m > mask_threshold)
            sprinkles[i] = (labels > 0) & (areas <= max_sprinkle_area)
    out = logits.float()
    dev = logits.device
    out = torch.where(torch.from_numpy(holes).to(dev).reshape(shape), mask_threshold + 10.0, out)
    out = torch.where(torch.from_numpy(sprinkles).to(dev).reshape(shape), mask_threshold - 10.0, out)
    return out


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Remove holes (``mode="holes"``) or islands (``mode="islands"``) under ``area_thresh`` pixels.

    8-connectivity. ``"holes"`` fills background components smaller than the threshold (including
    ones touching the border); ``"islands"`` drops foreground components smaller than it, keeping
    the largest one if all are small. Returns ``(new_mask, changed)``.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    work = ~mask if mode == "holes" else mask
    labels, n = ndimage.label(work, structure=_EIGHT_CONNECTED)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel())[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if mode == "holes":
        return mask | np.isin(labels, small), True
    big = np.flatnonzero(sizes >= area_thresh) + 1
    if big.size == 0:
        big = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, big), True
