"""Image encoder = Hiera trunk + FPN neck, producing the three feature levels SAM2 uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import SAM2Config
from .hiera import Hiera
from .position_encoding import PositionEmbeddingSine


class FpnNeck(nn.Module):
    """1x1 lateral convs to d_model, top-down nearest upsampling into the two deepest kept
    levels, sum fusion, and a sine position map per level."""

    def __init__(self, backbone_channel_list: list[int], d_model: int = 256, top_down_levels=(2, 3)):
        super().__init__()
        self.position_encoding = PositionEmbeddingSine(d_model)
        self.convs = nn.ModuleList()
        for ch in backbone_channel_list:  # deep to shallow
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(ch, d_model, kernel_size=1))
            self.convs.append(lateral)
        self.top_down_levels = set(top_down_levels)

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = len(self.convs) - 1
        feats: list[torch.Tensor] = [None] * (n + 1)  # type: ignore[list-item]
        prev = None
        for i in range(n, -1, -1):  # deep to shallow
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                top_down = F.interpolate(prev.to(torch.float32), scale_factor=2.0, mode="nearest")
                prev = lateral + top_down
            else:
                prev = lateral
            feats[i] = prev
        pos = [self.position_encoding(f) for f in feats]
        return feats, pos


class ImageEncoder(nn.Module):
    """B x 3 x 1024 x 1024 -> feature maps at strides 4, 8, 16 (the stride-32 level is dropped)."""

    def __init__(self, cfg: SAM2Config, scalp: int = 1):
        super().__init__()
        self.trunk = Hiera(cfg.trunk)
        self.neck = FpnNeck(list(cfg.backbone_channel_list), cfg.d_model)
        self.scalp = scalp

    def forward(self, image: torch.Tensor) -> dict:
        feats, pos = self.neck(self.trunk(image))
        if self.scalp > 0:
            # the coarsest map only fed the top-down path
            feats, pos = feats[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": feats[-1], "vision_pos_enc": pos, "backbone_fpn": feats}
