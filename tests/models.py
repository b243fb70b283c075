"""Small untrained networks for fast tests (no reference needed)."""

from __future__ import annotations

import torch

from napari_sam2.build import build_model


def random_model(size: int = 128, seed: int = 0, name: str = "sam2.1_hiera_tiny"):
    """Untrained network at input ``size`` with seeded noise on every tensor and objects made
    "present" (+2 on the object-score bias: untrained, every mask would be judged absent)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, pretrained=False, image_size=size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g) * 0.02)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(2.0)
    return model.eval()
