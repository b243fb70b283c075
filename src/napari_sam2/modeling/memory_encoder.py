"""Memory encoder: fuses a frame's image features with its predicted mask into a 64-channel memory."""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm2d
from .linear import Linear, linear_activation
from .position_encoding import PositionEmbeddingSine


class MaskDownSampler(nn.Module):
    """1 x 1024^2 mask -> 256 x 64^2 with four stride-2 convs (1 -> 4 -> 16 -> 64 -> 256 channels)."""

    def __init__(self, embed_dim: int = 256, num_layers: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        chans = 1
        for _ in range(num_layers):
            out = chans * 4
            layers += [nn.Conv2d(chans, out, kernel_size=3, stride=2, padding=1), LayerNorm2d(out), nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, LayerNorm, pointwise MLP, layer scale, residual."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(linear_activation(y, self.pwconv1, self.act))
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    def __init__(self, dim: int = 256, num_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    def __init__(self, in_dim: int = 256, out_dim: int = 64):
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.position_encoding = PositionEmbeddingSine(out_dim)

    def forward(self, pix_feat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pix_feat: B x 256 x 64 x 64 image features; mask: B x 1 x 1024 x 1024, already scaled
        (sigmoid or binarised, x20 - 10). Returns memory features and their position map, B x 64 x 64 x 64."""
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(mask)
        x = self.out_proj(self.fuser(x))
        return x, self.position_encoding(x)
