"""Hiera image encoder trunk (hierarchical ViT with windowed attention and query pooling).

Tokens stay in B x H x W x C layout throughout; the trunk returns one B x C x H x W map per stage
(strides 4, 8, 16, 32), shallow to deep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, bf16_cpu_inference
from .common import MLP, interpolate
from .configs import HieraConfig
from .linear import Linear


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """B x H x W x C -> (B * nW) x ws x ws x C, zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(x: torch.Tensor, ws: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    hp, wp = padded
    h, w = hw
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def pool_tokens(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """Apply a 2D pooling module to B x H x W x C tokens."""
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_cpu_inference(x):
            # a channels-last output makes the tokens below contiguous: otherwise the first stage's layer
            # norms, sums and windows each copy or stride through 65536 x 96 tokens (55 ms a frame)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x).permute(0, 2, 3, 1)  # B x H/4 x W/4 x C


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be max-pooled (halving the token grid)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = Linear(dim, dim_out * 3)
        self.proj = Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each B x HW x heads x d
        if self.q_pool is not None:
            q = pool_tokens(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; windowed unless ``window_size`` is 0 (global attention)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int, q_stride: int | None):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * 4.0), dim_out, num_layers=2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            # the residual path changes width (and resolution) with the block
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = pool_tokens(shortcut, self.pool)
        ws = self.window_size
        h, w = x.shape[1:3]
        if ws > 0:
            x, padded = window_partition(x, ws)
        x = self.attn(x)
        if ws > 0:
            if self.q_stride:
                # queries were pooled inside each window: windows shrank with them
                ws = ws // self.q_stride
                h, w = shortcut.shape[1:3]
                padded = (h + (ws - h % ws) % ws, w + (ws - w % ws) % ws)
            x = window_unpartition(x, ws, padded, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """The Hiera trunk of SAM2 (state-dict prefix ``image_encoder.trunk``)."""

    def __init__(self, cfg: HieraConfig):
        super().__init__()
        dim, heads = cfg.embed_dim, cfg.num_heads
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *cfg.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, dim, cfg.window_spec[0], cfg.window_spec[0]))
        self._pos_cache: tuple | None = None  # (key, parameters' storage, 1 x H x W x C map) of inference

        ends = [sum(cfg.stages[: i + 1]) - 1 for i in range(len(cfg.stages))]
        self.stage_ends = ends
        q_pool_blocks = {e + 1 for e in ends[:-1]}  # first block of stages 2..4
        global_blocks = set(cfg.global_att_blocks)
        blocks = []
        stage = 0
        for i in range(sum(cfg.stages)):
            dim_out = dim
            # the first block of a stage still works at the previous stage's window size
            window = cfg.window_spec[stage]
            if i - 1 in ends:
                dim_out, heads = dim * 2, heads * 2
                stage += 1
            blocks.append(
                MultiScaleBlock(
                    dim,
                    dim_out,
                    heads,
                    window_size=0 if i in global_blocks else window,
                    q_stride=2 if i in q_pool_blocks else None,
                )
            )
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)
        self.channel_list = list(reversed(cfg.channels))

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        params = (self.pos_embed, self.pos_embed_window)
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(p.is_inference() for p in params):
            # training: the embeddings learn; inference tensors keep no version to tell an edit by
            return self._compute_pos_embed(hw)
        # inference: the same map every frame (a bicubic resize, 50-70 ms per frame in bf16 on a CPU), kept
        # while the parameters hold the same storage at the same version (the cache holds that storage, so
        # no later tensor can take its address)
        key = (hw, tuple((p.data_ptr(), p.dtype, p.device, p._version) for p in params))
        if self._pos_cache is None or self._pos_cache[0] != key:
            # contiguous tokens: the sum with the patch embedding reads them in its order (through a strided map
            # it took 11 ms instead of 0.8 ms in bf16 on 2 cores)
            self._pos_cache = (key, tuple(p.detach() for p in params), self._compute_pos_embed(hw).contiguous())
        return self._pos_cache[2]

    def _apply(self, fn, recurse=True):
        self._pos_cache = None  # moved or recast (.to, set_precision): drop the old map and storage now
        return super()._apply(fn, recurse)

    def _compute_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        pos = interpolate(self.pos_embed, size=hw, mode="bicubic")
        win = self.pos_embed_window
        pos = pos + win.tile(1, 1, hw[0] // win.shape[-2], hw[1] // win.shape[-1])
        return pos.permute(0, 2, 3, 1)  # 1 x H x W x C

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self._pos_embed(x.shape[1:3])
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.stage_ends:
                outs.append(x.permute(0, 3, 1, 2))
        return outs
