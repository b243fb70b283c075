"""Validation of a model being fine-tuned: semi-supervised video object segmentation scores.

Each validation clip is tracked twice from its first frame, as a user would start: once from the
ground-truth masks, once from one click per object (the centre-most pixel of its mask); no corrective
clicks. The masklets are scored against the ground truth with the DAVIS measures: J (region IoU),
F (boundary F-measure, boundaries matched within 0.8 % of the image diagonal) and J&F, averaged over
objects and frames (frame 0, the prompted one, excluded).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from scipy import ndimage

from ..modeling.sam2 import SAM2
from .forward import split_frames, track_clip
from .prompts import PromptPlan, PromptSettings

NO_CORRECTIONS = PromptSettings(num_correction_clicks=0, prob_click_from_gt=0.0)


def centre_clicks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N x S x S bool -> one positive click per object at its innermost pixel (N x 1 x 2, N x 1)."""
    coords = torch.zeros(masks.shape[0], 1, 2)
    for b, m in enumerate(masks.cpu().numpy()):
        depth = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(depth.argmax()), depth.shape)
        coords[b, 0] = torch.tensor([x, y], dtype=torch.float32)
    return coords.to(masks.device), torch.ones(masks.shape[0], 1, dtype=torch.int32, device=masks.device)


def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """J: IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = 0.008) -> float:
    """F: boundary precision / recall F-measure, boundary pixels matched within ``tolerance`` x diagonal."""
    bp, bg = _boundary(pred), _boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    radius = max(1, int(np.ceil(tolerance * np.hypot(*pred.shape))))
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    precision = (bp & ndimage.binary_dilation(bg, disk)).sum() / bp.sum()
    recall = (bg & ndimage.binary_dilation(bp, disk)).sum() / bg.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def score_masklets(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """pred, gt: T x N x H x W bool. J, F and J&F means over objects and frames 1..T-1 (all frames
    for a single image)."""
    frames = range(1, pred.shape[0]) if pred.shape[0] > 1 else range(1)
    js, fs = [], []
    for t in frames:
        for n in range(pred.shape[1]):
            js.append(region_similarity(pred[t, n], gt[t, n]))
            fs.append(boundary_f(pred[t, n], gt[t, n]))
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {"J": j, "F": f, "JF": (j + f) / 2}


#: image encoder output of validation clips kept between validations when the encoder does not train
#: (at 1024: 88 MiB per frame, 256-channel high-resolution levels before the decoder's projections)
FEATURES_BUDGET = 2 << 30  # bytes


@contextmanager
def _evaluating(model: SAM2):
    """The model in eval mode (no dropout, no drop-path) for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def track_from_first_frame(model: SAM2, gt: torch.Tensor, prompt: str, feats: list) -> np.ndarray:
    """Masklets (T x N x S x S bool) tracked from frame 0's ground-truth ``"mask"`` or ``"click"``;
    ``feats``: the clip's image features, one per frame (:class:`ValidationFeatures`)."""
    with _evaluating(model):
        plan = PromptPlan(use_points=prompt == "click", init_cond_frames=[0], frames_to_correct=[], num_frames=gt.shape[0])
        if prompt == "mask":
            plan.mask_inputs[0] = gt[0].unsqueeze(1).float()
        else:
            coords, labels = centre_clicks(gt[0])
            plan.point_inputs[0] = {"point_coords": coords, "point_labels": labels}
        out = track_clip(model, feats, gt, plan, np.random.default_rng(0), settings=NO_CORRECTIONS)
        return torch.stack([o["pred_masks_high_res"][:, 0] > 0 for o in out]).cpu().numpy()


class ValidationFeatures:
    """The validation clips' image features, encoded once per validation for both prompts. While the
    image encoder does not train, its output is kept from one validation to the next (up to ``budget``
    bytes; beyond, clips are encoded again); the decoder's projections of the high-resolution levels,
    which do train, run on it each time."""

    def __init__(self, keep: bool, budget: int = FEATURES_BUDGET):
        self.keep = keep
        self.budget = budget
        self._kept: dict[int, dict] = {}
        self._bytes = 0
        self.encoded = 0  # clips run through the image encoder

    @torch.inference_mode()
    def __call__(self, model: SAM2, index: int, images: torch.Tensor) -> list:
        with _evaluating(model):
            levels = self._kept.get(index)
            if levels is None:
                out = model.run_image_encoder(images, encoder_grad=False)
                # only what the features are made of: the 3 levels the decoder and memory read, the last position map
                levels = {"backbone_fpn": list(out["backbone_fpn"]), "vision_pos_enc": [out["vision_pos_enc"][-1]]}
                self.encoded += 1
                size = sum(t.numel() * t.element_size() for t in (*levels["backbone_fpn"], *levels["vision_pos_enc"]))
                if self.keep and self._bytes + size <= self.budget:
                    self._kept[index] = levels
                    self._bytes += size
            return split_frames(model.frame_features(model.project_high_res(levels)))


def validate(model: SAM2, clips, device, features: ValidationFeatures | None = None) -> dict[str, float]:
    """Mean scores over validation clips: ``val_J_mask``, ``val_JF_mask``, ``val_J_click``, ... ."""
    features = features or ValidationFeatures(keep=False)
    sums: dict[str, list[float]] = {}
    for i, clip in enumerate(clips):
        images, gt = clip.images.to(device), clip.masks.to(device)
        feats = features(model, i, images)
        for prompt in ("mask", "click"):
            pred = track_from_first_frame(model, gt, prompt, feats)
            for key, value in score_masklets(pred, gt.cpu().numpy()).items():
                sums.setdefault(f"val_{key}_{prompt}", []).append(value)
    return {key: float(np.mean(v)) for key, v in sums.items()}
