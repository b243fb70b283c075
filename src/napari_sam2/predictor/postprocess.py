"""Mask post-processing on the CPU (scipy): no CUDA extension needed."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def component_areas(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D boolean array: (labels, area of each pixel's component, 0 off it)."""
    labels, n = ndimage.label(binary, structure=_EIGHT)
    if n == 0:
        return labels, np.zeros(binary.shape, dtype=np.int64)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return labels, areas[labels]


def fill_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Turn background components (logits <= 0, 8-connected) of at most ``max_area`` pixels into
    foreground with a small positive score (0.1), as SAM2 does. mask_logits: B x 1 x H x W."""
    if max_area <= 0:
        return mask_logits
    background = (mask_logits <= 0).cpu().numpy()
    holes = np.zeros_like(background)
    for i in range(background.shape[0]):
        labels, areas = component_areas(background[i, 0])
        holes[i, 0] = (labels > 0) & (areas <= max_area)
    if not holes.any():
        return mask_logits
    return torch.where(torch.from_numpy(holes).to(mask_logits.device), torch.tensor(0.1, dtype=mask_logits.dtype), mask_logits)


def non_overlapping(mask_logits: torch.Tensor) -> torch.Tensor:
    """Keep each pixel for the highest-scoring object only; the others' logits there are capped at -10.
    mask_logits: N x 1 x H x W for N objects."""
    if mask_logits.shape[0] <= 1:
        return mask_logits
    winner = mask_logits.argmax(dim=0, keepdim=True)
    ids = torch.arange(mask_logits.shape[0], device=mask_logits.device)[:, None, None, None]
    return torch.where(winner == ids, mask_logits, mask_logits.clamp(max=-10.0))
