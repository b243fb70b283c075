"""Mask decoder: two-way transformer over prompt tokens and image features, 3 multimask outputs plus
a single-mask output, IoU head and object-present (occlusion) head."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


def stability_score(
    logits: torch.Tensor, offset: float, mask_threshold: float = 0.0, empty_score: float | None = None
) -> torch.Tensor:
    """Stability of masks: IoU of the masks thresholded at ``mask_threshold + offset`` and at
    ``mask_threshold - offset``.

    The single implementation, used by the decoder's dynamic multimask choice (offset 0.05,
    threshold 0) and by the automatic mask generator (offset 1.0). For ``offset >= 0`` the first
    mask lies inside the second, so the IoU is a ratio of pixel counts.

    Parameters
    ----------
    logits
        ``... x H x W`` mask logits (any float dtype; the thresholds are compared in that dtype).
    offset
        Logit offset around ``mask_threshold``.
    mask_threshold
        Logit threshold of the masks.
    empty_score
        Score of a mask empty at both thresholds. None: NaN (0 / 0), as the official automatic mask
        generator; the decoder uses 1.0, as the official ``_dynamic_multimask_via_stability``.

    Returns
    -------
    torch.Tensor
        ``...`` float32 scores.
    """
    # written exactly as the official decoder computes it (parity tests compare bit for bit): Python
    # float thresholds (compared in the logits' dtype), exact integer counts, float32 division
    logits = logits.flatten(-2)  # ... x (H * W)
    inter = _count_above(logits, mask_threshold + offset).float()
    union = _count_above(logits, mask_threshold - offset).float()
    if empty_score is None:
        return inter / union
    return torch.where(union > 0, inter / union, empty_score)


def _count_above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``... x N`` -> ``...`` int64 number of values > ``threshold`` (compared in ``x``'s dtype).

    On the CPU numpy counts about ten times faster than torch's sum of a bool tensor (this is most
    of the automatic mask generator's time after the decoder); the counts are the same integers.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.count_nonzero(x.numpy() > threshold, axis=-1).astype(np.int64, copy=False))
    return (x > threshold).sum(-1)


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ):
        super().__init__()
        d = transformer_dim
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=d, num_heads=8, mlp_dim=2048)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.obj_score_token = nn.Embedding(1, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        # project the stride-4 and stride-8 backbone maps for the upscaling path
        self.conv_s0 = nn.Conv2d(d, d // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(d, d // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(d, 256, self.num_mask_tokens, 3, sigmoid_output=True)
        self.pred_obj_score_head = MLP(d, d, 1, 3)
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor],
        repeat_image: bool = False,
    ):
        """Returns masks (B x M x 256 x 256 logits), IoU (B x M), output tokens for the object pointer
        (B x M x C) and object-score logits (B x 1); M is 3 with multimask_output, else 1."""
        masks, iou, mask_tokens_out, obj_score = self._predict(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features, repeat_image
        )
        if multimask_output:
            return masks[:, 1:], iou[:, 1:], mask_tokens_out[:, 1:], obj_score
        if not self.training:
            masks, iou = self._pick_stable(masks, iou)
        else:
            masks, iou = masks[:, :1], iou[:, :1]
        return masks, iou, mask_tokens_out[:, :1], obj_score

    def _predict(self, image, image_pe, sparse, dense, high_res_features, repeat_image):
        b = sparse.shape[0]
        out_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        if repeat_image:
            image = torch.repeat_interleave(image, b, dim=0)
        src = image + dense
        pos = image_pe.expand(b, -1, -1, -1) if image_pe.shape[0] == 1 else image_pe
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = act1(ln1(dc1(src) + feat_s1))
        up = act2(dc2(up) + feat_s0)

        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c, h, w = up.shape
        masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(iou_token_out)
        obj_score = self.pred_obj_score_head(hs[:, 0, :])
        return masks, iou, mask_tokens_out, obj_score

    def stability_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """IoU between the masks thresholded at +delta and at -delta (1 where both are empty);
        ``... x H x W`` logits -> ``...`` scores (see :func:`stability_score`)."""
        return stability_score(logits, self.stability_delta, empty_score=1.0)

    def _pick_stable(self, masks: torch.Tensor, iou: torch.Tensor):
        """Single-mask output, unless it is unstable: then the best of the 3 multimask outputs."""
        best = iou[:, 1:].argmax(dim=-1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = iou[:, 1:][rows, best].unsqueeze(1)
        stable = self.stability_scores(masks[:, :1]) >= self.stability_thresh  # B x 1
        return (
            torch.where(stable[..., None, None], masks[:, :1], best_masks),
            torch.where(stable, iou[:, :1], best_iou),
        )
