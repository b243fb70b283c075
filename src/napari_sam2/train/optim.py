"""The reference's fine-tuning optimiser recipe: AdamW, layer-wise lr decay, cosine schedule, clipping.

Mirrors ``sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml`` (section ``optim``) as
``training.optimizer.construct_optimizer`` turns it into parameter groups, without hydra or fvcore:

* lr: ``lr`` for every parameter, ``vision_lr`` for ``image_encoder.*``, times a layer-wise decay
  over ``image_encoder.trunk`` (``layer_decay_param_modifier`` with Hiera's BEiT-style
  ``get_layer_id``): ``layer_decay ** (num_blocks + 1 - layer_id)`` where ``layer_id`` is 0 for the
  patch embedding, ``i + 1`` for block ``i`` and ``num_blocks + 1`` (no decay) for anything else;
  ``*pos_embed*`` is overridden to 1.0.
* weight decay: ``weight_decay`` except 0.0 for ``*bias*`` names and parameters owned directly by an
  ``nn.LayerNorm``. Like the reference, the channel-wise ``LayerNorm2d`` of the SAM heads is not an
  ``nn.LayerNorm``: its weight is decayed.
* schedule: every group follows a cosine from its start lr to a tenth of it (fvcore
  ``CosineParamScheduler``); weight decay stays constant.
* gradients: clipped to a total L2 norm of 0.1.

Only parameters with ``requires_grad`` enter the groups, so a partly frozen model (e.g. LoRA) works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

TRUNK = "image_encoder.trunk"
VISION = "image_encoder."
# the config's vision lr relative to its base lr (3e-6 / 5e-6)
VISION_LR_RATIO = 3.0 / 5.0
FINAL_LR_RATIO = 0.1
MAX_GRAD_NORM = 0.1


def _trunk_layer_id(name: str, num_blocks: int) -> int:
    """Hiera's (BEiT's) layer id of a trunk parameter: 0 embeddings, i + 1 block i, num_blocks + 1 rest."""
    if "rel_pos" in name:
        return num_blocks + 1
    if "pos_embed" in name or "patch_embed" in name:
        return 0
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    return num_blocks + 1


def lr_scale(name: str, num_blocks: int, layer_decay: float) -> float:
    """The layer-wise decay factor of parameter ``name`` (1.0 outside ``image_encoder.trunk``)."""
    if not name.startswith(TRUNK):
        return 1.0
    if "pos_embed" in name:
        # the yaml's override: the position embeddings learn at the full vision lr
        return 1.0
    # layer_decay_param_modifier counts one layer more than the trunk has blocks
    return layer_decay ** (num_blocks + 1 - _trunk_layer_id(name, num_blocks))


def _layernorm_param_names(model: nn.Module) -> set[str]:
    """Names of the parameters an ``nn.LayerNorm`` owns itself (not through a child)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


def _num_trunk_blocks(model: nn.Module) -> int:
    encoder = getattr(model, "image_encoder", None)
    trunk = getattr(encoder, "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    return len(blocks) if blocks is not None else 0


def param_groups(
    model: nn.Module,
    *,
    lr: float = 5e-6,
    vision_lr: float | None = None,
    weight_decay: float = 0.1,
    layer_decay: float = 0.9,
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of ``model``.

    ``vision_lr`` defaults to ``lr * 3/5`` (the config's 3e-6 against 5e-6), so that changing ``lr``
    alone keeps the image encoder's rate in the same proportion. Each group holds ``params``,
    ``names`` (their parameter names), ``lr`` and ``initial_lr`` (its start lr) and ``weight_decay``;
    groups come in the order their first parameter appears in ``model.named_parameters()``.
    """
    if vision_lr is None:
        vision_lr = lr * VISION_LR_RATIO
    num_blocks = _num_trunk_blocks(model)
    no_decay = _layernorm_param_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = vision_lr if name.startswith(VISION) else lr
        group_lr = base * lr_scale(name, num_blocks, layer_decay)
        wd = 0.0 if ("bias" in name or name in no_decay) else weight_decay
        # parameters with the same start lr and decay follow the same schedule: one group
        group = groups.setdefault(
            (group_lr, wd), {"params": [], "names": [], "lr": group_lr, "initial_lr": group_lr, "weight_decay": wd}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = 5e-6,
    vision_lr: float | None = None,
    weight_decay: float = 0.1,
    layer_decay: float = 0.9,
) -> torch.optim.AdamW:
    """AdamW (torch's default betas and eps, as the reference) over :func:`param_groups`."""
    groups = param_groups(model, lr=lr, vision_lr=vision_lr, weight_decay=weight_decay, layer_decay=layer_decay)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to optimise.")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def cosine_factor(step: int, total_steps: int, final_ratio: float = FINAL_LR_RATIO) -> float:
    """Cosine from 1 at step 0 to ``final_ratio`` at ``total_steps`` (held there after).

    fvcore's ``CosineParamScheduler(start, end)`` at ``where = step / total_steps``:
    ``end + 0.5 * (start - end) * (1 + cos(pi * where))`` with start 1 and end ``final_ratio``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    where = min(max(step / total_steps, 0.0), 1.0)
    return final_ratio + 0.5 * (1.0 - final_ratio) * (1.0 + math.cos(math.pi * where))


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
    """Set every group's lr to its ``initial_lr`` times :func:`cosine_factor` for ``step``."""
    factor = cosine_factor(step, total_steps)
    for group in optimizer.param_groups:
        # a group made elsewhere starts from the lr it has now, as torch's schedulers do
        start = group.setdefault("initial_lr", group["lr"])
        group["lr"] = start * factor


def clip_gradients(params: Iterable[torch.Tensor] | nn.Module, max_norm: float = MAX_GRAD_NORM) -> float:
    """Scale the gradients of ``params`` (or of a module's parameters) to a total L2 norm of at most
    ``max_norm``; returns the total norm before clipping (for logging; inf or nan when a gradient is)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0))
