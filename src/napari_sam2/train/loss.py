"""The training loss: SAM2's multi-step, multi-mask loss (mask focal + dice, IoU regression, object score).

For every frame of a clip and every prediction step on it (the first prediction and each corrective
click), the loss of the best of the candidate masks (lowest ``20 * focal + dice``) is back-propagated;
the predicted IoUs of all candidates are regressed (L1) onto their true IoUs; mask and IoU terms only
count where the object is present in the ground truth; the object score is a plain BCE on presence.
Everything is divided by the number of objects of the clip and summed over steps and frames: the
reference recipe's ``MultiStepMultiMasksAndIous`` with its fine-tuning weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_NAMES = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


@dataclass(frozen=True)
class LossWeights:
    mask: float = 20.0  # sigmoid focal
    dice: float = 1.0
    iou: float = 1.0
    object_score: float = 1.0


def _focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-element sigmoid focal loss (RetinaNet); ``alpha < 0`` means no class weighting."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N x M x H x W -> N x M soft dice loss, +1 smoothing on both sides."""
    p = logits.sigmoid().flatten(2)
    t = targets.flatten(2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def _true_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N x M x H x W -> N x M IoU of the thresholded masks (an empty union counts as IoU 0)."""
    pred, gt = logits.flatten(2) > 0, targets.flatten(2) > 0
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return inter / union.clamp(min=1.0)


def step_losses(
    masks: torch.Tensor, ious: torch.Tensor, object_scores: torch.Tensor, target: torch.Tensor, num_objects: float,
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """One prediction step. masks: N x M x H x W logits (M candidates); ious: N x M; object_scores: N x 1;
    target: N x 1 x H x W float ground truth. Returns the four unweighted terms (scalars)."""
    target = target.expand_as(masks)
    focal = _focal(masks, target, alpha=0.25, gamma=2.0).flatten(2).mean(-1) / num_objects  # N x M
    dice = _dice(masks, target) / num_objects  # N x M
    iou = F.l1_loss(ious, _true_iou(masks, target), reduction="none") / num_objects  # N x M
    present = (target[:, 0] > 0).flatten(1).any(dim=-1, keepdim=True).float()  # N x 1
    cls = _focal(object_scores, present, alpha=-1.0, gamma=0.0).mean(1).sum() / num_objects
    if masks.shape[1] > 1:
        # only the best candidate learns the mask; every candidate learns its IoU
        best = (focal * weights.mask + dice * weights.dice).argmin(dim=-1, keepdim=True)  # N x 1
        focal, dice = focal.gather(1, best), dice.gather(1, best)
        iou = iou.mean(dim=-1, keepdim=True)
    return {
        "loss_mask": (focal * present).sum(),
        "loss_dice": (dice * present).sum(),
        "loss_iou": (iou * present).sum(),
        "loss_class": cls,
    }


def clip_loss(frame_outputs: list[dict], targets: torch.Tensor, weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """The loss of a tracked clip.

    frame_outputs: one dict per frame with the lists ``multistep_pred_multimasks_high_res`` (N x M x H x W),
    ``multistep_pred_ious`` (N x M) and ``multistep_object_score_logits`` (N x 1), one entry per step;
    targets: T x N x H x W ground truth. Returns the four terms summed over frames and steps, and
    ``"loss"``, their weighted sum (what is back-propagated).
    """
    if len(frame_outputs) != targets.shape[0]:
        raise ValueError(f"{len(frame_outputs)} frame outputs for {targets.shape[0]} target frames")
    num_objects = float(max(targets.shape[1], 1))
    totals = {name: targets.new_zeros((), dtype=torch.float32) for name in LOSS_NAMES}
    for out, target in zip(frame_outputs, targets):
        steps = zip(out["multistep_pred_multimasks_high_res"], out["multistep_pred_ious"], out["multistep_object_score_logits"])
        for masks, ious, scores in steps:
            for name, value in step_losses(masks, ious, scores, target.unsqueeze(1).float(), num_objects, weights).items():
                totals[name] = totals[name] + value
    totals["loss"] = (
        totals["loss_mask"] * weights.mask
        + totals["loss_dice"] * weights.dice
        + totals["loss_iou"] * weights.iou
        + totals["loss_class"] * weights.object_score
    )
    return totals
