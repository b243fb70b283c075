"""Clip augmentations for fine-tuning: one random transform per clip, applied alike to every frame.

:class:`Augment` holds the ranges, :meth:`Augment.draw` picks one :class:`ClipTransform` from a
``numpy.random.Generator``. The transform is applied in three places along the pre-processing path:

1. :func:`zoom_window` + :func:`crop` on the frame as read (scale jitter: a window ``1 / scale`` of the
   frame, padded when ``scale < 1``, placed so that the clip's objects of frame 0 stay in view);
2. :func:`apply_intensity` on the ``[0, 1]`` image at network resolution (gain, gamma, Gaussian noise);
3. :func:`apply_geometry` on images and masks at network resolution (flips, 90-degree rotations),
   before the ImageNet mean / std (:func:`imagenet_normalize`).

:func:`resize_unit` and :func:`resize_masks` are the resizes of the inference path
(:func:`napari_sam2.predictor.preprocess.to_model_input`, ``mask_to_model_input``), split so that the
intensity changes can sit between the resize and the normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.common import interpolate
from ..predictor.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Augment", "ClipTransform", "zoom_window", "crop", "resize_unit", "resize_masks",
           "imagenet_normalize", "apply_intensity", "apply_geometry"]


@dataclass(frozen=True)
class ClipTransform:
    """One clip's augmentation; the identity by default."""

    hflip: bool = False
    vflip: bool = False
    rot90: int = 0  # quarter turns, counter-clockwise (torch.rot90)
    scale: float = 1.0  # > 1 zooms in (crops), < 1 zooms out (pads)
    gain: float = 1.0
    gamma: float = 1.0
    noise_std: float = 0.0  # in units of the [0, 1] image


@dataclass(frozen=True)
class Augment:
    """Ranges of the clip augmentations (probabilities for the flips, ``(low, high)`` for the rest).

    Use ``Augment(scale=(1, 1))`` etc. to switch one off; ``ClipSampler(augment=Augment(...))`` takes it.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    gain: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)  # drawn log-uniformly: as likely darker as brighter
    noise_std: tuple[float, float] = (0.0, 0.03)

    def draw(self, rng: np.random.Generator) -> ClipTransform:
        # every value is drawn every time, in a fixed order, so that one switched-off augmentation
        # does not shift the random stream of the others
        hflip = bool(rng.random() < self.hflip)
        vflip = bool(rng.random() < self.vflip)
        k = int(rng.integers(4))
        scale = float(rng.uniform(*self.scale))
        gain = float(rng.uniform(*self.gain))
        gamma = float(math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]))))
        noise = float(rng.uniform(*self.noise_std))
        return ClipTransform(hflip=hflip, vflip=vflip, rot90=k if self.rot90 else 0, scale=scale,
                             gain=gain, gamma=gamma, noise_std=noise)


def zoom_window(hw: tuple[int, int], bbox: tuple[int, int, int, int], scale: float,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The ``(y0, x0, height, width)`` window of an ``hw`` frame to resize to the network input.

    The window is ``hw / scale`` (larger than the frame when ``scale < 1``: ``y0``/``x0`` are then
    negative), shrunk in zoom so that ``bbox = (y0, x0, y1, x1)`` (the clip's objects in frame 0)
    fits, and placed at random where it contains ``bbox``.
    """
    height, width = hw
    by0, bx0, by1, bx1 = bbox
    scale = min(scale, height / max(by1 - by0, 1), width / max(bx1 - bx0, 1))
    h = max(round(height / scale), by1 - by0, 1)
    w = max(round(width / scale), bx1 - bx0, 1)

    def offset(n: int, size: int, b0: int, b1: int) -> int:
        lo = max(b1 - size, min(0, n - size))
        hi = min(b0, max(0, n - size))
        return int(rng.integers(lo, max(lo, hi) + 1))

    return offset(height, h, by0, by1), offset(width, w, bx0, bx1), h, w


def crop(array: np.ndarray, window: tuple[int, int, int, int], fill=0) -> np.ndarray:
    """``array[y0:y0+h, x0:x0+w]`` (H x W or H x W x C), padded with ``fill`` outside the frame."""
    y0, x0, h, w = window
    height, width = array.shape[:2]
    if (y0, x0, h, w) == (0, 0, height, width):
        return array
    out = np.full((h, w) + array.shape[2:], fill, dtype=array.dtype)
    sy0, sy1 = max(y0, 0), min(y0 + h, height)
    sx0, sx1 = max(x0, 0), min(x0 + w, width)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def resize_unit(unit: np.ndarray, size: int) -> torch.Tensor:
    """float32 H x W (grey) or H x W x 3 in [0, 1] -> C x size x size (C = 1 or 3), resized exactly as
    ``to_model_input`` does (which replicates grey only after the resize)."""
    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # C x H x W
    if tuple(x.shape[-2:]) != (size, size):
        x = interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.contiguous()


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """... x C x S x S in [0, 1] (C = 1: grey, broadcast) -> ... x 3 x S x S network input (ImageNet mean / std)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype)[:, None, None]
    return ((x - mean) / std).contiguous()


def resize_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W bool -> N x size x size bool: antialiased bilinear, then >= 0.5 (``mask_to_model_input``).

    An object that the threshold would erase (thinner than one network pixel) keeps the pixels where
    its resized mask is at least half its maximum, so that an object in the frame is never lost.
    """
    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]  # N x 1 x H x W
    if tuple(m.shape[-2:]) == (size, size) or m.shape[0] == 0:
        if m.shape[0] == 0:
            return torch.zeros((0, size, size), dtype=torch.bool)
        return m[:, 0] > 0.5
    r = interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]  # N x S x S
    out = r >= 0.5
    lost = ~out.flatten(1).any(1) & (r.flatten(1).amax(1) > 0)
    for n in lost.nonzero().flatten().tolist():
        out[n] = r[n] >= 0.5 * r[n].max()
    return out


def apply_intensity(x: torch.Tensor, transform: ClipTransform, rng: np.random.Generator) -> torch.Tensor:
    """T x C x S x S in [0, 1] -> the same with the clip's gain, gamma and Gaussian noise, clipped to [0, 1].

    Grey frames (C = 1) get one noise image, so that they stay grey as at inference; RGB frames get
    independent noise per channel.
    """
    x = (x * transform.gain).clamp_(0, 1) ** transform.gamma
    if transform.noise_std > 0:
        noise = rng.standard_normal(tuple(x.shape), dtype=np.float32) * np.float32(transform.noise_std)
        x = (x + torch.from_numpy(noise)).clamp_(0, 1)
    return x


def apply_geometry(x: torch.Tensor, transform: ClipTransform) -> torch.Tensor:
    """Flip / rotate the last two (square) dimensions of images or masks, the same for both."""
    if transform.hflip:
        x = x.flip(-1)
    if transform.vflip:
        x = x.flip(-2)
    if transform.rot90:
        x = torch.rot90(x, transform.rot90, dims=(-2, -1))
    return x.contiguous()
