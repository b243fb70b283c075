"""Attention layers: SAM's two-way transformer (prompt tokens <-> image) and the RoPE attention
used by memory attention."""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention, spelled_out_bf16_inference
from .common import MLP
from .linear import Linear
from .position_encoding import apply_rope, axial_rope_angles


class Attention(nn.Module):
    """Multi-head attention with an optional down-projected internal width and key/value width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, kv_in_dim: int | None = None):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0, "num_heads must divide embedding_dim"
        kv_in_dim = kv_in_dim or embedding_dim
        self.q_proj = Linear(embedding_dim, self.internal_dim)
        self.k_proj = Linear(kv_in_dim, self.internal_dim)
        self.v_proj = Linear(kv_in_dim, self.internal_dim)
        self.out_proj = Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B x h x N x d

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        return self._out(attention(q, k, v))


class RoPEAttention(Attention):
    """Attention with axial 2D rotary position encoding on queries and keys.

    Keys may cover several frames of the same grid (``rope_k_repeat``); the last
    ``num_k_exclude_rope`` keys (object pointer tokens) carry no spatial position.
    """

    def __init__(
        self, *args, rope_theta: float = 10000.0, rope_k_repeat: bool = False, feat_sizes=(64, 64),
        dropout: float = 0.0, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.dropout_p = dropout  # attention dropout, training mode only
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self._set_grid(*feat_sizes)

    def _set_grid(self, end_x: int, end_y: int, device=None) -> None:
        # a table made under inference mode could not serve a later training step: never make it there
        with torch.inference_mode(False):
            angles = axial_rope_angles(self.internal_dim // self.num_heads, end_x, end_y, self.rope_theta)
            self._freqs = torch.polar(torch.ones_like(angles), angles).to(device or "cpu")

    def _projects_values_late(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether to attend over the narrow input values and project the result instead: softmax rows sum
        to one, so P (V_in W^T + b) = (P V_in) W^T + b, and with memory attention's 64-wide memories under
        a 256-wide head the product with the probabilities (one of attention's two big products) does a
        quarter of the work. Only on the bf16 matrix-product path (the rounding moves; fp32 keeps the
        reference's order, and torch's kernels want one width for keys and values; in training mode a
        dropped probability leaves rows that no longer sum to one)."""
        return (
            self.num_heads == 1 and self.v_proj.in_features < self.internal_dim and not self.training
            and spelled_out_bf16_inference(q, k, v)
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        late_values = self._projects_values_late(q, k, v)
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(v if late_values else self.v_proj(v))  # late: B x 1 x Lk x kv_in_dim
        n = q.shape[-2]
        if self._freqs.shape[0] != n or self._freqs.device != q.device:
            side = int(round(n**0.5))
            self._set_grid(side, side, q.device)
        if q.shape[-2] != k.shape[-2] and not self.rope_k_repeat:
            raise ValueError("keys cover more positions than queries but rope_k_repeat is off")
        q = apply_rope(q, self._freqs)
        if q.shape[0] == 1 and k.shape[0] > 1:
            q = q.expand(k.shape[0], -1, -1, -1)  # queries shared by every key set of the batch
        n_rope = k.shape[-2] - num_k_exclude_rope
        if n_rope > 0:
            # k is this call's own projection: rotate its spatial tokens in place, pointers stay as they are
            apply_rope(k[:, :, :n_rope], self._freqs, out=k[:, :, :n_rope])
        dropout_p = self.dropout_p if self.training else 0.0
        out = attention(q, k, v, dropout_p=dropout_p)
        if late_values:
            out = self.v_proj(out)  # B x 1 x Lq x kv_in_dim -> B x 1 x Lq x d
        return self._out(out)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, tokens->image, MLP on tokens, image->tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, num_layers=2, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            # the first layer's queries are the prompt embeddings themselves: no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image, image_pe: B x C x H x W; tokens: B x N x C -> (tokens B x N x C, image B x HW x C)."""
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
