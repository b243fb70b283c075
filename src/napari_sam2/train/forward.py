"""The training forward pass: a whole clip tracked step by step, with the simulated prompts.

The network is the one inference uses (:class:`~napari_sam2.modeling.sam2.SAM2`), called through its
own pieces (image features, memory attention, SAM heads, memory encoder); only the bookkeeping of a
clip lives here, never the video predictor's state machine. Per frame the output keeps every
prediction step (the first mask and one per corrective click) for :func:`~.loss.clip_loss`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.sam2 import SAM2, FrameFeatures
from .prompts import DEFAULT_PROMPTS, ClickSampler, PromptPlan, PromptSettings, concat_points, error_click


def clip_features(model: SAM2, images: torch.Tensor, train_encoder: bool) -> list[FrameFeatures]:
    """T x 3 x S x S -> per-frame features, each with batch 1. A frozen encoder runs without a graph."""
    return split_frames(model.encode_frame(images, encoder_grad=train_encoder))


def split_frames(feats: FrameFeatures) -> list[FrameFeatures]:
    """Features of T frames (batch T) -> one FrameFeatures (batch 1) per frame, as views."""
    return [
        FrameFeatures(feats.embed[t : t + 1], feats.pos[t : t + 1], (feats.high_res[0][t : t + 1], feats.high_res[1][t : t + 1]))
        for t in range(feats.embed.shape[0])
    ]


def _sam_step(model: SAM2, pix, feats: FrameFeatures, is_init: bool, point_inputs, mask_inputs=None) -> dict:
    return model.sam_heads(pix, feats.high_res, point_inputs, mask_inputs, model.use_multimask(is_init, point_inputs))


def track_clip(
    model: SAM2,
    features: list[FrameFeatures],
    gt_masks: torch.Tensor,
    plan: PromptPlan,
    rng: np.random.Generator,
    click: ClickSampler | None = None,
    settings: PromptSettings = DEFAULT_PROMPTS,
) -> list[dict]:
    """Track N objects through a clip. gt_masks: T x N x S x S bool (the correction clicks' source).

    Returns one dict per frame (time order) with ``multistep_pred_multimasks_high_res``,
    ``multistep_pred_ious``, ``multistep_object_score_logits`` (lists, one per step),
    ``pred_masks_high_res`` (N x 1 x S x S, the final mask) and ``point_inputs`` (all clicks given).
    ``click`` samples a corrective click (default: uniform over the error region).
    """
    click = click or error_click
    num_frames, n = gt_masks.shape[:2]
    memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    outputs: dict[int, dict] = {}
    for t in plan.processing_order:
        feats = features[t].expand(n)
        is_init = t in plan.init_cond_frames
        points = plan.point_inputs.get(t)
        mask = plan.mask_inputs.get(t)
        if mask is not None:
            out, pix = model.mask_as_output(feats.embed, feats.high_res, mask), None
        else:
            if is_init:
                pix = feats.embed + model.no_mem_embed.reshape(1, -1, 1, 1)  # N x 256 x h x w
            else:
                pix = model.condition_on_memory(feats, t, memory, num_frames)
            out = _sam_step(model, pix, feats, is_init, points)
        steps = [out]
        if t in plan.frames_to_correct:
            gt = gt_masks[t].unsqueeze(1)  # N x 1 x S x S
            for _ in range(settings.num_correction_clicks):
                from_gt = settings.prob_click_from_gt > 0 and rng.random() < settings.prob_click_from_gt
                coords, labels = click(gt, None if from_gt else out["pred_masks_high_res"] > 0)
                points = concat_points(points, coords, labels)
                # the current prediction goes back in with the click, as in interactive refinement
                out = _sam_step(model, pix, feats, is_init, points, out["pred_masks"])
                steps.append(out)
        entry = {
            "maskmem_features": model.encode_memory(feats, out["pred_masks_high_res"], out["object_score_logits"], points is not None),
            "obj_ptr": out["obj_ptr"],
        }
        as_cond = is_init or (settings.add_corrected_as_cond and t in plan.frames_to_correct)
        memory["cond_frame_outputs" if as_cond else "non_cond_frame_outputs"][t] = entry
        outputs[t] = {
            "multistep_pred_multimasks_high_res": [s["multimasks_high_res"] for s in steps],
            "multistep_pred_ious": [s["ious"] for s in steps],
            "multistep_object_score_logits": [s["object_score_logits"] for s in steps],
            "pred_masks_high_res": out["pred_masks_high_res"],
            "point_inputs": points,
        }
    return [outputs[t] for t in range(num_frames)]
