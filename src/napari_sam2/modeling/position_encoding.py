"""Position encodings: 2D sine maps, random Fourier features for prompts, 1D sine for time,
and the axial 2D rotary encoding (RoPE) used by memory attention."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2D sine/cosine map (DETR style) for B x C x H x W features.

    ``num_pos_feats`` is the output channel count; half of it encodes y, half x.
    Maps depend only on (H, W), so they are cached per size, device and dtype.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0):
        super().__init__()
        assert num_pos_feats % 2 == 0
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.scale = 2 * math.pi
        self._cache: dict[tuple, torch.Tensor] = {}

    def _map(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # per dtype too: converting a 256 x 256 x 256 map to bf16 on every frame cost more than computing it
        key = (h, w, device, dtype)
        if key not in self._cache:
            with torch.inference_mode(False):  # a cache made under inference mode could not serve training
                self._cache[key] = self._compute(h, w, device).to(dtype)
        return self._cache[key]

    def _compute(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        eps = 1e-6
        y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
        y = y / (y[-1] + eps) * self.scale
        x = x / (x[-1] + eps) * self.scale
        d = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        d = self.temperature ** (2 * (d // 2) / self.num_pos_feats)
        px = x[:, None] / d  # W x F
        py = y[:, None] / d  # H x F
        # interleave sin of even and cos of odd frequencies
        px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
        py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (py[:, None, :].expand(h, w, -1), px[None, :, :].expand(h, w, -1)), dim=2
        )
        return pos.permute(2, 0, 1).contiguous()  # C x H x W

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self._map(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return pos.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates (SAM prompt encoder)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0):
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        # coords in [0, 1] -> [-1, 1] -> random projection -> sin/cos
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([coords.sin(), coords.cos()], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense C x H x W encoding of a grid of pixel centres."""
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack((x[None, :].expand(h, w), y[:, None].expand(h, w)), dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """B x N x 2 pixel (x, y) coordinates -> B x N x C."""
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._encode(coords.to(torch.float))


def get_1d_sine_pe(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine encoding of (possibly fractional, signed) 1D positions: N -> N x dim."""
    half = dim // 2
    d = torch.arange(half, dtype=torch.float32, device=pos.device)
    d = temperature ** (2 * (d // 2) / half)
    angles = pos.unsqueeze(-1) / d
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def axial_rope_angles(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of the axial 2D RoPE for an end_y x end_x token grid (row major).

    Returns (end_x * end_y) x (dim // 2): the first dim // 4 pairs rotate with x, the rest with y.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y)
    tx = (t % end_x).float()
    ty = torch.div(t, end_x, rounding_mode="floor").float()
    return torch.cat([torch.outer(tx, freqs), torch.outer(ty, freqs)], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (... x N x D) by unit complex numbers ``freqs`` (N x D/2),
    into ``out`` (of ``x``'s shape; it may be ``x`` itself) or a new tensor of ``x``'s dtype.

    ``x`` may hold a whole number of repeats of the N positions along its token axis (the memory
    bank's frames share one grid of positions).
    """
    n, half = freqs.shape
    xf = x.float()
    xc = torch.view_as_complex(xf.reshape(*x.shape[:-2], -1, n, half, 2))  # ... x reps x N x D/2
    # broadcast over the repeats rather than repeating freqs: MPS has no complex repeat
    if xf is x:
        rotated = xc * freqs
    else:
        # a bf16 x: the fp32 copy is this call's own, rotated where it lies (no second 50 MiB block of
        # memory attention's keys to allocate and fault in)
        rotated = xc.mul_(freqs)
    rotated = torch.view_as_real(rotated).reshape(x.shape)
    # straight into the destination's dtype: one pass fewer than casting and then copying
    return rotated.type_as(x) if out is None else out.copy_(rotated)
