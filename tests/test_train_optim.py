"""The fine-tuning optimiser (napari_sam2.train.optim) against the reference's recipe.

The reference is ``training.optimizer.construct_optimizer`` fed the ``optim`` section of
``sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml`` as the reference trainer does.
fvcore (its schedulers) is not installed: a stand-in with fvcore's formulas takes its module name.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from napari_sam2.build import build_model
from napari_sam2.train.lora import add_lora
from napari_sam2.train.optim import (
    build_optimizer,
    clip_gradients,
    cosine_factor,
    param_groups,
    set_learning_rates,
)

NAME = "sam2.1_hiera_tiny"
SIZE = 128
TOTAL = 100
WHERE = {0: 0.0, TOTAL // 2: 0.5, TOTAL: 1.0}  # step -> fvcore's "where"


class CosineParamScheduler:
    """fvcore.common.param_scheduler.CosineParamScheduler, formula as fvcore documents it."""

    def __init__(self, start_value: float, end_value: float):
        self.start, self.end = start_value, end_value

    def __call__(self, where: float) -> float:
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * where))


class ConstantParamScheduler:
    def __init__(self, value: float):
        self.value = value

    def __call__(self, where: float) -> float:
        return self.value


@pytest.fixture
def fake_fvcore(monkeypatch):
    mod = types.ModuleType("fvcore.common.param_scheduler")
    mod.CosineParamScheduler, mod.ConstantParamScheduler = CosineParamScheduler, ConstantParamScheduler
    monkeypatch.setitem(sys.modules, "fvcore", types.ModuleType("fvcore"))
    monkeypatch.setitem(sys.modules, "fvcore.common", types.ModuleType("fvcore.common"))
    monkeypatch.setitem(sys.modules, "fvcore.common.param_scheduler", mod)


def reference_optim_config():
    import sam2
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("divide"):
        # registered by the reference's train.py (training.utils.train_utils.register_omegaconf_resolvers)
        OmegaConf.register_new_resolver("divide", lambda x, y: x / y)
    path = Path(sam2.__file__).parent / "configs" / "sam2.1_training" / "sam2.1_hiera_b+_MOSE_finetune.yaml"
    cfg = OmegaConf.load(path)
    return OmegaConf.create(OmegaConf.to_container(cfg.trainer.optim, resolve=True))


def reference_assignment(model) -> dict[str, tuple[list[float], float]]:
    """name -> ([lr at where 0, 0.5, 1], weight decay) as the reference trainer's optimiser sets them."""
    from training.optimizer import construct_optimizer

    optim = reference_optim_config()
    assert optim.gradient_clip.max_norm == 0.1 and optim.optimizer._target_ == "torch.optim.AdamW"
    opt = construct_optimizer(model, optim.optimizer, optim.options, optim.param_group_modifiers)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[list[float], float]] = {}
    for where in WHERE.values():
        opt.step_schedulers(where, 0)
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                out.setdefault(names[id(p)], ([], group["weight_decay"]))[0].append(group["lr"])
    return out


def our_assignment(model) -> dict[str, tuple[list[float], float]]:
    opt = build_optimizer(model)
    out: dict[str, tuple[list[float], float]] = {}
    for step in WHERE:
        set_learning_rates(opt, step, TOTAL)
        for group in opt.param_groups:
            for name in group["names"]:
                out.setdefault(name, ([], group["weight_decay"]))[0].append(group["lr"])
    return out


def assert_same_assignment(ours, ref):
    assert set(ours) == set(ref)
    for name in ref:
        (lrs, wd), (ref_lrs, ref_wd) = ours[name], ref[name]
        assert wd == ref_wd, f"{name}: weight decay {wd} vs reference {ref_wd}"
        assert lrs == pytest.approx(ref_lrs, rel=1e-12, abs=0), f"{name}: lr {lrs} vs reference {ref_lrs}"


@pytest.fixture(scope="module")
def model():
    return build_model(NAME, pretrained=False, image_size=SIZE)


def test_matches_reference_on_reference_model(require_reference, fake_fvcore, model):
    """Per parameter name: our groups on our model = the reference recipe on the reference's own model
    (its Hiera's get_layer_id, its module classes for the LayerNorm rule)."""
    from reference import build_reference

    ref_model = build_reference(NAME, perturb=False, image_size=256)
    assert_same_assignment(our_assignment(model), reference_assignment(ref_model))


def test_matches_reference_on_our_model(require_reference, fake_fvcore, model, monkeypatch):
    """The reference recipe applied to our model itself (the reference Hiera's layer-id methods bound
    to our trunk, which has none): our module classes give the same weight-decay split."""
    from sam2.modeling.backbones.hieradet import Hiera

    trunk = model.image_encoder.trunk
    monkeypatch.setattr(trunk, "get_layer_id", types.MethodType(Hiera.get_layer_id, trunk), raising=False)
    monkeypatch.setattr(trunk, "get_num_layers", types.MethodType(Hiera.get_num_layers, trunk), raising=False)
    assert_same_assignment(our_assignment(model), reference_assignment(model))


def test_known_values(model):
    """Spot checks written out by hand (tiny: 12 Hiera blocks)."""
    lr = {n: g["lr"] for g in param_groups(model) for n in g["names"]}
    wd = {n: g["weight_decay"] for g in param_groups(model) for n in g["names"]}
    vision = 3e-6
    assert lr["image_encoder.trunk.patch_embed.proj.weight"] == pytest.approx(vision * 0.9**13)
    assert lr["image_encoder.trunk.blocks.0.attn.qkv.weight"] == pytest.approx(vision * 0.9**12)
    assert lr["image_encoder.trunk.blocks.11.mlp.layers.1.weight"] == pytest.approx(vision * 0.9)
    assert lr["image_encoder.trunk.pos_embed"] == pytest.approx(vision)
    assert lr["image_encoder.trunk.pos_embed_window"] == pytest.approx(vision)
    assert lr["image_encoder.neck.convs.0.conv.weight"] == pytest.approx(vision)
    assert lr["sam_mask_decoder.iou_prediction_head.layers.0.weight"] == pytest.approx(5e-6)
    assert lr["memory_attention.layers.0.self_attn.q_proj.weight"] == pytest.approx(5e-6)
    assert wd["memory_attention.layers.0.norm1.weight"] == 0.0  # nn.LayerNorm
    assert wd["sam_mask_decoder.output_upscaling.1.weight"] == 0.1  # LayerNorm2d, as in the reference
    assert wd["image_encoder.trunk.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["image_encoder.trunk.pos_embed"] == 0.1
    # changing lr alone keeps the config's vision/base ratio
    scaled = {n: g["lr"] for g in param_groups(model, lr=1e-4) for n in g["names"]}
    assert scaled["image_encoder.neck.convs.0.conv.weight"] == pytest.approx(6e-5)


def test_groups_hold_trainable_parameters_once(model):
    groups = param_groups(model)
    for g in groups:
        assert set(g) >= {"params", "lr", "initial_lr", "weight_decay", "names"}
        assert len(g["params"]) == len(g["names"]) and g["lr"] == g["initial_lr"]
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    assert all(params[n] is p for g in groups for n, p in zip(g["names"], g["params"]))


def test_frozen_parameters_are_left_out():
    model = build_model(NAME, pretrained=False, image_size=SIZE)
    model.image_encoder.requires_grad_(False)
    names = {n for g in param_groups(model) for n in g["names"]}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("image_encoder.") for n in names)

    # LoRA: adapters in the trunk still get their block's layer decay
    lora = add_lora(build_model(NAME, pretrained=False, image_size=SIZE), rank=2)
    groups = param_groups(lora)
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    assert set(lr) == {n for n, p in lora.named_parameters() if p.requires_grad}
    assert lr["image_encoder.trunk.blocks.11.attn.qkv.lora_A.default.weight"] == pytest.approx(3e-6 * 0.9)

    model.requires_grad_(False)
    assert param_groups(model) == []
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model)


def test_cosine_schedule():
    assert cosine_factor(0, 10) == pytest.approx(1.0)
    assert cosine_factor(5, 10) == pytest.approx(0.55)  # 0.1 + 0.5 * 0.9 * (1 + cos(pi/2))
    assert cosine_factor(10, 10) == pytest.approx(0.1)
    assert cosine_factor(25, 10) == pytest.approx(0.1)  # held at the end
    assert cosine_factor(5, 10, final_ratio=0.0) == pytest.approx(0.5)
    factors = [cosine_factor(s, 10) for s in range(11)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    with pytest.raises(ValueError):
        cosine_factor(0, 0)


def test_set_learning_rates_follows_each_groups_start():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    for step, factor in ((0, 1.0), (50, 0.55), (100, 0.1)):
        set_learning_rates(opt, step, 100)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([factor, 0.5 * factor])


def test_optimizer_steps(model):
    model = build_model(NAME, pretrained=False, image_size=SIZE)
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    p = model.no_mem_embed
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p, before)


def test_clip_gradients_caps_the_total_norm():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    want = math.sqrt(9 * 3 + 16 * 4)
    assert clip_gradients([a, b]) == pytest.approx(want)
    total = torch.cat([a.grad, b.grad]).norm()
    assert float(total) == pytest.approx(0.1, rel=1e-4)
    assert torch.allclose(a.grad / b.grad[:3], torch.tensor(0.75))  # direction kept

    small = torch.nn.Linear(2, 1)
    small.weight.grad, small.bias.grad = torch.full((1, 2), 0.01), torch.full((1,), 0.02)
    g = small.weight.grad.clone()
    assert clip_gradients(small, max_norm=0.1) == pytest.approx(math.sqrt(2 * 1e-4 + 4e-4))
    assert torch.equal(small.weight.grad, g)  # under the cap: untouched
    assert clip_gradients(torch.nn.Linear(2, 1)) == 0.0  # no gradients yet
