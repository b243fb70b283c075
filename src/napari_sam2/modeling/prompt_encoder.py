"""Prompt encoder: clicks and box corners -> sparse tokens, a mask -> a dense embedding."""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm2d
from .position_encoding import PositionEmbeddingRandom

# point labels: -1 padding, 0 negative click, 1 positive click, 2 box top-left, 3 box bottom-right
PAD_LABEL = -1


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int = 256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """1 x C x 64 x 64 encoding of the image embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # pixel centre
        if pad:
            # a "not a point" token so the decoder always sees a point slot (as SAM was trained)
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == PAD_LABEL, self.not_a_point_embed.weight, emb)
        for value, table in enumerate(self.point_embeddings):
            emb = torch.where(labels == value, emb + table.weight, emb)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        emb[:, 0, :] += self.point_embeddings[2].weight
        emb[:, 1, :] += self.point_embeddings[3].weight
        return emb

    def forward(self, points=None, boxes=None, masks=None):
        """points: (coords B x N x 2 in input pixels (x, y), labels B x N); boxes: B x 4 (x0, y0, x1, y1);
        masks: B x 1 x 256 x 256 logits. Returns sparse B x K x C and dense B x C x 64 x 64 embeddings."""
        bs = next((t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1)
        dev = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=dev)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
