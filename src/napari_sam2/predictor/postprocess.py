"""Logits -> masks: the one home of post-processing (resize, holes, sprinkles, small regions,
non-overlap). On the CPU with scipy: no CUDA extension needed."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..modeling.common import resize_masks

#: 8-connectivity, as the official connected-components kernel
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def resize_logits(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``B x C x h x w`` logits -> ``B x C x H x W`` (bilinear, half-pixel centres); unchanged when
    they already have that size."""
    size = tuple(int(v) for v in hw)
    return masks if tuple(masks.shape[-2:]) == size else resize_masks(masks, size)


def component_areas(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D boolean array: (labels, area of each pixel's component, 0 off it)."""
    labels, n = ndimage.label(binary, structure=EIGHT_CONNECTED)
    if n == 0:
        return labels, np.zeros(binary.shape, dtype=np.int64)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return labels, areas[labels]


def to_host(values: torch.Tensor, flags: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` (float32) and ``flags`` (bool, optional) as numpy arrays of their shapes, in one
    device -> host copy: on a GPU each copy is a synchronisation, and a tracking step needs both."""
    values = values.detach().to(torch.float32).contiguous()
    parts = [values.reshape(-1).view(torch.uint8)]
    if flags is not None:
        parts.append(flags.detach().contiguous().reshape(-1).view(torch.uint8))
    host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().numpy()
    split = values.numel() * 4
    out_values = host[:split].view(np.float32).reshape(values.shape)
    out_flags = None if flags is None else host[split:].view(bool).reshape(flags.shape)
    return out_values, out_flags


def fill_holes(mask_logits: torch.Tensor, max_area: int, background: np.ndarray | None = None) -> torch.Tensor:
    """Turn background components (logits <= 0, 8-connected) of at most ``max_area`` pixels into
    foreground with a small positive score (0.1), as SAM2 does. mask_logits: B x 1 x H x W;
    ``background``: ``mask_logits <= 0`` already on the host (see :func:`to_host`)."""
    if max_area <= 0:
        return mask_logits
    if background is None:
        background = (mask_logits <= 0).cpu().numpy()
    holes = np.zeros_like(background)
    for i in range(background.shape[0]):
        labels, areas = component_areas(background[i, 0])
        holes[i, 0] = (labels > 0) & (areas <= max_area)
    if not holes.any():
        return mask_logits
    holes = torch.from_numpy(holes)
    if mask_logits.device.type == "cuda":
        holes = holes.pin_memory()  # so that the upload does not wait
    return torch.where(holes.to(mask_logits.device, non_blocking=True), 0.1, mask_logits)


def non_overlapping(mask_logits: torch.Tensor) -> torch.Tensor:
    """Keep each pixel for the highest-scoring object only; the others' logits there are capped at -10.
    mask_logits: N x 1 x H x W for N objects."""
    if mask_logits.shape[0] <= 1:
        return mask_logits
    winner = mask_logits.argmax(dim=0, keepdim=True)
    ids = torch.arange(mask_logits.shape[0], device=mask_logits.device)[:, None, None, None]
    return torch.where(winner == ids, mask_logits, mask_logits.clamp(max=-10.0))


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
    labels, n = ndimage.label(work, structure=EIGHT_CONNECTED)
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
