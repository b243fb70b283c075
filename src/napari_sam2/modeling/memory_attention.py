"""Memory attention: conditions the current frame's features on the memory bank.

Four pre-norm layers of self-attention (RoPE), cross-attention to memories (RoPE on the spatial
memory tokens, none on object-pointer tokens) and a ReLU feed-forward network. Dropout (0.1, as the
official configs) acts only in training mode: inference is untouched by it.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear, linear_activation
from .transformer import RoPEAttention


class MemoryAttentionLayer(nn.Module):
    def __init__(self, d_model: int = 256, mem_dim: int = 64, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads=1, dropout=dropout)
        self.cross_attn_image = RoPEAttention(
            d_model, num_heads=1, rope_k_repeat=True, kv_in_dim=mem_dim, dropout=dropout
        )
        self.linear1 = Linear(d_model, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        # no parameters: the state dict keeps the official keys
        self.activation = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_keys, num_k_exclude_rope: int = 0):
        """memory_keys = memory + its positions: keys carry positions, queries get them only through RoPE."""
        x = self.norm1(tgt)
        tgt = tgt + self.dropout1(self.self_attn(x, x, x))
        x = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.cross_attn_image(x, memory_keys, memory, num_k_exclude_rope=num_k_exclude_rope))
        x = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(linear_activation(x, self.linear1, self.activation))))


class MemoryAttention(nn.Module):
    def __init__(self, d_model: int = 256, mem_dim: int = 64, num_layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(d_model, mem_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """curr, curr_pos: B x HW x C, or 1 x HW x C for features shared by the B memory banks (the first
        layer's self-attention and queries then run once); memory, memory_pos: B x M x mem_dim, the last
        ``num_obj_ptr_tokens`` of which are object-pointer tokens. Returns B x HW x C."""
        x = curr + 0.1 * curr_pos
        memory_keys = memory + memory_pos  # the same for every layer: computed once
        for layer in self.layers:
            x = layer(x, memory, memory_keys, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(x)
