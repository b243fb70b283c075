"""LoRA adapters (napari_sam2.train.lora): what they wrap, that they start as a no-op, that merging
them gives the same network with the official keys, and that only they learn."""

from __future__ import annotations

import copy

import pytest
import torch
from models import random_model
from torch import nn

from napari_sam2.build import build_model
from napari_sam2.modeling.hiera import MultiScaleAttention
from napari_sam2.modeling.transformer import Attention
from napari_sam2.train.lora import (
    LORA_TARGETS,
    add_lora,
    lora_target_modules,
    lora_trainable_names,
    merge_lora,
)

NAME = "sam2.1_hiera_tiny"
SIZE = 128
RANK = 4
OUTPUTS = ("multimasks", "ious", "pred_masks", "pred_masks_high_res", "obj_ptr", "object_score_logits", "maskmem_features")


@pytest.fixture(scope="module")
def base():
    return random_model(SIZE, seed=0, name=NAME)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, generator=g)  # frames 0 and 1


def adapted(base, **kwargs):
    return add_lora(copy.deepcopy(base), RANK, **kwargs)


def randomise_lora(model, seed=0):
    """Adapters far from their zero init, so that a wrong merge shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def attention_projections(model) -> set[str]:
    """The linear layers directly inside SAM2's attention modules (Hiera's, memory attention's, the
    two-way transformer's): what LoRA is meant to adapt, found by module type rather than by name."""
    return {
        f"{name}.{child_name}"
        for name, module in model.named_modules()
        if isinstance(module, (MultiScaleAttention, Attention))
        for child_name, child in module.named_children()
        if isinstance(child, nn.Linear)
    }


def two_steps(model, images):
    """Frame 0 with one positive click (conditioning frame, memory encoded), then frame 1 tracked from
    that memory: runs the image encoder, memory attention, the prompt encoder and the mask decoder."""
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    click = {"point_coords": torch.tensor([[[SIZE * 0.4, SIZE * 0.55]]]), "point_labels": torch.tensor([[1]], dtype=torch.int32)}
    feats0 = model.encode_frame(images[:1])
    out0 = model.track_step(feats0, 0, True, memory=bank, num_frames=2, point_inputs=click)
    bank["cond_frame_outputs"][0] = out0
    out1 = model.track_step(model.encode_frame(images[1:]), 1, False, memory=bank, num_frames=2)
    return feats0, out0, out1


def assert_steps_close(a, b, atol=0.0, rtol=0.0):
    feats_a, *steps_a = a
    feats_b, *steps_b = b
    torch.testing.assert_close(feats_a.embed, feats_b.embed, atol=atol, rtol=rtol)
    for t, (oa, ob) in enumerate(zip(steps_a, steps_b)):
        for key in OUTPUTS:
            if key in oa or key in ob:
                torch.testing.assert_close(oa[key], ob[key], atol=atol, rtol=rtol, msg=lambda m, k=key, t=t: f"frame {t} {k}: {m}")


def test_targets_are_exactly_the_attention_projections(base):
    targets = set(lora_target_modules(base))
    assert targets == attention_projections(base)
    # 12 Hiera blocks x (qkv, proj) + 4 memory-attention layers x 2 x 4 + 7 decoder attentions x 4
    assert len(targets) == 24 + 32 + 28
    # names that also end in a target suffix but are not attention: the residual and conv projections
    for other in ("image_encoder.trunk.blocks.1.proj", "image_encoder.trunk.patch_embed.proj", "memory_encoder.out_proj"):
        assert other not in targets
    assert all(any(t == s or t.endswith("." + s) for s in LORA_TARGETS) for t in targets)


def test_only_lora_is_trainable(base):
    model = adapted(base)
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == attention_projections(base)
    names = lora_trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert set(names) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(names) == 2 * len(wrapped)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_train_heads_trains_the_mask_decoder_without_adapters(base):
    model = adapted(base, train_heads=True)
    names = set(lora_trainable_names(model))
    decoder = {n for n, _ in model.named_parameters() if n.startswith("sam_mask_decoder.")}
    assert decoder <= names
    assert not any(".lora_" in n for n in decoder)  # its projections are trained directly
    assert names - decoder == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert any(n.startswith("memory_attention.") for n in names - decoder)


def test_add_lora_rejects_bad_input(base):
    with pytest.raises(ValueError, match="rank"):
        add_lora(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="already"):
        add_lora(adapted(base), RANK)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(copy.deepcopy(base))


@torch.no_grad()
def test_fresh_adapters_change_nothing(base, image):
    """LoRA B starts at zero: image features and both tracking steps are bit-identical to the base."""
    model = adapted(base, alpha=8.0).eval()
    assert_steps_close(two_steps(model, image), two_steps(base, image), atol=0.0)


@torch.no_grad()
def test_merged_equals_adapted_and_loads_strictly(base, image, tmp_path):
    model = adapted(base, alpha=8.0).eval()
    randomise_lora(model)
    ours = two_steps(model, image)
    # the adapters do change the outputs, so the comparison below can catch a wrong merge
    assert not torch.allclose(ours[0].embed, two_steps(base, image)[0].embed, atol=1e-3)

    merged = merge_lora(model)
    assert any(hasattr(m, "lora_A") for m in model.modules())  # the adapted model is left as it was
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    # x W^T + s (x A^T) B^T and x (W + s B A)^T round differently; over 12 Hiera blocks the image
    # features (|x| up to ~5) drift by ~1e-6 relative, hence rtol next to the absolute 1e-5
    assert_steps_close(two_steps(merged, image), ours, atol=1e-5, rtol=1e-5)

    fresh = build_model(NAME, pretrained=False, image_size=SIZE)
    sd = merged.state_dict()
    assert list(sd.keys()) == list(fresh.state_dict().keys())
    fresh.load_state_dict(sd, strict=True)

    path = tmp_path / "merged.pt"
    torch.save({"model": sd}, path)
    loaded = build_model(NAME, checkpoint=path, device="cpu", image_size=SIZE)
    assert_steps_close(two_steps(loaded, image), two_steps(merged, image), atol=0.0)


def test_merge_in_place(base, image):
    model = adapted(base).eval()
    randomise_lora(model, seed=3)
    with torch.no_grad():
        want = model.encode_frame(image[:1]).embed
        merged = merge_lora(model, inplace=True)
        assert merged is model and not any(hasattr(m, "lora_A") for m in model.modules())
        torch.testing.assert_close(merged.encode_frame(image[:1]).embed, want, atol=1e-5, rtol=1e-5)


def test_backward_reaches_only_the_adapters(base, image):
    model = adapted(base).train()
    randomise_lora(model)  # with B = 0 the gradient of every A would be exactly zero
    _, out0, out1 = two_steps(model, image)
    loss = out0["pred_masks_high_res"].float().square().mean() + out1["pred_masks_high_res"].float().square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name}: no gradient (not on the loss's path?)"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
