"""Prompt simulation for training: which frames are prompted, with what, and the corrective clicks.

A clip is prompted like a user would (the SAM2 paper's interactive training, with the reference
fine-tuning recipe's probabilities): on 1-2 initial conditioning frames (always the first) either the
ground-truth mask or, with probability 0.5, clicks - one positive click sampled in the object or, with
probability 0.5 of those, its box (with SAM's corner noise). With clicks, 1-2 frames (the initial
ones first) then get 7 corrective clicks each, every one sampled uniformly from the error region of the
model's own current prediction (from the ground truth itself with probability 0.1), and become
conditioning frames. A 1-frame clip (a single annotated image) is always prompted with clicks.

Decisions are drawn from a ``numpy.random.Generator``, pixel positions from a ``torch.Generator``:
both seeded by the caller, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

BOX_LABELS = (2, 3)  # SAM's labels of a box's top-left and bottom-right corners


@dataclass(frozen=True)
class PromptSettings:
    prob_points: float = 0.5  # else the ground-truth mask
    prob_box: float = 0.5  # of the point cases: a box instead of a click
    num_init_cond_frames: int = 2
    rand_init_cond_frames: bool = True  # 1..num_init_cond_frames
    num_frames_to_correct: int = 2
    rand_frames_to_correct: bool = True  # num_init..num_frames_to_correct
    num_correction_clicks: int = 7
    prob_click_from_gt: float = 0.1
    add_corrected_as_cond: bool = True


DEFAULT_PROMPTS = PromptSettings()


@dataclass
class PromptPlan:
    """The prompts of one clip (N objects, input size S)."""

    use_points: bool
    init_cond_frames: list[int]
    frames_to_correct: list[int]
    num_frames: int = 1
    point_inputs: dict[int, dict] = field(default_factory=dict)  # t -> point_coords N x P x 2 (x, y), point_labels N x P
    mask_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # t -> N x 1 x S x S float

    @property
    def processing_order(self) -> list[int]:
        """Initial conditioning frames first (encoded as memory), then the others in time order."""
        return self.init_cond_frames + self.frames_not_in_init_cond

    @property
    def frames_not_in_init_cond(self) -> list[int]:
        return [t for t in range(self.num_frames) if t not in self.init_cond_frames]


# a click sampler: (gt N x 1 x H x W bool, prediction N x 1 x H x W bool or None) -> (N x 1 x 2, N x 1)
ClickSampler = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def error_click(gt: torch.Tensor, pred: torch.Tensor | None, generator: torch.Generator | None = None):
    """One click per object, uniform over its error region: positive in a missed part (false negative),
    negative in a false positive; where the prediction is already right, a negative click in the
    background. ``pred=None`` counts as an empty prediction (a click inside the object).
    Returns point coords N x 1 x 2 (x, y in input pixels, float) and labels N x 1 (int32)."""
    if gt.dtype != torch.bool or gt.ndim != 4 or gt.shape[1] != 1:
        raise ValueError(f"gt must be a bool N x 1 x H x W tensor, got {gt.dtype} {tuple(gt.shape)}")
    pred = torch.zeros_like(gt) if pred is None else pred
    n, _, h, w = gt.shape
    fn = (gt & ~pred).flatten(1)  # N x HW
    fp = (~gt & pred).flatten(1)
    coords = torch.zeros(n, 1, 2)
    labels = torch.zeros(n, 1, dtype=torch.int32)
    for b in range(n):
        region, positive = fn[b] | fp[b], fn[b]
        if not bool(region.any()):
            region = ~gt[b].flatten()  # all correct: a negative click in the background
        idx = torch.nonzero(region).flatten().cpu()
        if idx.numel() == 0:
            continue  # the object fills the frame and is predicted so: (0, 0), negative
        pick = int(idx[torch.randint(idx.numel(), (1,), generator=generator)])
        coords[b, 0] = torch.tensor([pick % w, pick // w], dtype=torch.float32)
        labels[b, 0] = int(bool(positive[pick]))
    return coords.to(gt.device), labels.to(gt.device)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W bool -> N x 4 (x0, y0, x1, y1), the inclusive pixel bounds of each mask."""
    n, _, h, w = masks.shape
    flat_y, flat_x = masks[:, 0].any(dim=2), masks[:, 0].any(dim=1)  # N x H, N x W
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    x0 = torch.where(flat_x, xs, w).min(dim=1).values
    x1 = torch.where(flat_x, xs, -1).max(dim=1).values
    y0 = torch.where(flat_y, ys, h).min(dim=1).values
    y1 = torch.where(flat_y, ys, -1).max(dim=1).values
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def noisy_box(masks: torch.Tensor, generator: torch.Generator | None = None, noise: float = 0.1, bound: float = 20.0):
    """A box prompt from masks, each corner moved by up to 10 % of the box side (at most 20 px), as SAM
    trains. Returns corner coords N x 2 x 2 and labels N x 2 (2 = top-left, 3 = bottom-right)."""
    n, _, h, w = masks.shape
    box = mask_boxes(masks)  # N x 4
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    max_dx = torch.clamp(bw * noise, max=bound)
    max_dy = torch.clamp(bh * noise, max=bound)
    jitter = 2 * torch.rand(n, 4, generator=generator) - 1
    box = box + jitter.to(box.device) * torch.stack([max_dx, max_dy, max_dx, max_dy], dim=1)
    upper = torch.tensor([w, h, w, h], dtype=box.dtype, device=box.device) - 1
    box = torch.minimum(box.clamp(min=0), upper)
    labels = torch.tensor(BOX_LABELS, dtype=torch.int32, device=masks.device).repeat(n, 1)
    return box.reshape(n, 2, 2), labels


def concat_points(point_inputs: dict | None, coords: torch.Tensor, labels: torch.Tensor) -> dict:
    if point_inputs is None:
        return {"point_coords": coords, "point_labels": labels}
    return {
        "point_coords": torch.cat([point_inputs["point_coords"], coords], dim=1),
        "point_labels": torch.cat([point_inputs["point_labels"], labels], dim=1),
    }


def plan_prompts(
    gt_masks: torch.Tensor,
    rng: np.random.Generator,
    generator: torch.Generator | None = None,
    settings: PromptSettings = DEFAULT_PROMPTS,
) -> PromptPlan:
    """Draw the prompts of a clip. gt_masks: T x N x S x S bool (every object present on frame 0)."""
    num_frames = gt_masks.shape[0]
    prob_points, n_correct, n_init = settings.prob_points, settings.num_frames_to_correct, settings.num_init_cond_frames
    if num_frames == 1:
        # a single image trains SAM's interactive task: always clicks
        prob_points, n_correct, n_init = 1.0, 1, 1
    use_points = bool(rng.random() < prob_points)
    if settings.rand_init_cond_frames and n_init > 1:
        n_init = int(rng.integers(1, n_init, endpoint=True))
    n_init = min(n_init, num_frames)
    if use_points and settings.rand_frames_to_correct and n_correct > n_init:
        n_correct = int(rng.integers(n_init, n_correct, endpoint=True))
    n_correct = min(max(n_correct, n_init), num_frames)
    init = [0]
    if n_init > 1:
        init += rng.choice(range(1, num_frames), n_init - 1, replace=False).tolist()
    plan = PromptPlan(use_points=use_points, init_cond_frames=init, frames_to_correct=[], num_frames=num_frames)
    for t in init:
        gt = gt_masks[t].unsqueeze(1)  # N x 1 x S x S
        if not use_points:
            plan.mask_inputs[t] = gt.float()
        elif rng.random() < settings.prob_box:
            coords, labels = noisy_box(gt, generator)
            plan.point_inputs[t] = {"point_coords": coords, "point_labels": labels}
        else:
            coords, labels = error_click(gt, None, generator)
            plan.point_inputs[t] = {"point_coords": coords, "point_labels": labels}
    if use_points:
        extra = n_correct - n_init
        others = plan.frames_not_in_init_cond
        plan.frames_to_correct = list(init)
        if extra > 0:
            plan.frames_to_correct += rng.choice(others, extra, replace=False).tolist()
    return plan
