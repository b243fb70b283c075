"""What the network computes once per size instead of once per frame at inference: Hiera's resized
position embedding and the sine position maps. Never stale: a changed, moved or recast parameter gives
a new map, and training always computes it from the current values."""

from __future__ import annotations

import torch
from models import random_model


def _counted_model(monkeypatch):
    """A random network whose Hiera trunk counts how often it computes its position embedding."""
    model = random_model(128)
    trunk = model.image_encoder.trunk
    calls = []
    real = trunk._compute_pos_embed
    monkeypatch.setattr(trunk, "_compute_pos_embed", lambda hw: calls.append(hw) or real(hw))
    return model, trunk, calls


def test_hiera_resizes_its_position_embedding_once_per_size_at_inference(monkeypatch):
    model, trunk, calls = _counted_model(monkeypatch)
    image = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        first = model.forward_image(image)["vision_features"]
        again = model.forward_image(image)["vision_features"]
    with torch.no_grad():
        model.forward_image(image)
    assert len(calls) == 1
    assert torch.equal(first, again)


def test_a_changed_or_recast_position_embedding_is_never_served_stale(monkeypatch):
    model, trunk, calls = _counted_model(monkeypatch)
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = model.forward_image(image)["vision_features"]
        trunk.pos_embed.add_(0.5)  # edited in place (e.g. load_state_dict): its version changes
        edited = model.forward_image(image)["vision_features"]
        assert len(calls) == 2
        assert not torch.equal(before, edited)
        trunk.pos_embed.sub_(0.5)
        model.set_precision(torch.bfloat16)  # new storage in another dtype
        model.forward_image(image)
        assert len(calls) == 3
        model.set_precision(torch.float32)  # back: new fp32 storage, values rounded through bf16
        model.forward_image(image)
        assert len(calls) == 4


def test_training_computes_the_position_embedding_from_the_current_values(monkeypatch):
    model, trunk, calls = _counted_model(monkeypatch)
    model.train()
    image = torch.randn(1, 3, 128, 128)
    for _ in range(2):
        model.forward_image(image)["vision_features"].sum().backward()
    assert len(calls) == 2
    assert trunk.pos_embed.grad is not None and trunk.pos_embed.grad.abs().sum() > 0


def test_sine_position_maps_come_in_the_features_dtype():
    model = random_model(128)
    enc = model.memory_encoder.position_encoding
    x32 = torch.zeros(1, 64, 8, 8)
    with torch.inference_mode():
        p32 = enc(x32)
        p16 = enc(x32.bfloat16())
    assert p32.dtype == torch.float32 and p16.dtype == torch.bfloat16
    assert torch.equal(p16, p32.bfloat16())
    assert not p16.is_inference()  # made outside inference mode: it can serve a later training step
