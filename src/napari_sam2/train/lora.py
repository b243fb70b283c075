"""LoRA adapters on SAM2's attention projections (with ``peft``), and merging them back.

Adapted layers (``LORA_TARGETS``, matched as dotted-name suffixes on ``nn.Linear`` modules only):

* Hiera trunk blocks: ``attn.qkv`` and ``attn.proj`` (not the block's residual ``proj``, which
  widens the skip path between stages, nor the convolutional ``patch_embed.proj``);
* memory attention ``self_attn`` / ``cross_attn_image`` and the mask decoder's two-way transformer
  (``self_attn``, ``cross_attn_token_to_image``, ``cross_attn_image_to_token``,
  ``final_attn_token_to_image``): ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (not the memory
  encoder's ``out_proj``, a 1x1 convolution).

LoRA B starts at zero, so an adapted model computes exactly what the base model does until trained.
:func:`merge_lora` folds ``W + scale * B @ A`` into the base weights and hands back a plain SAM2 whose
state dict has the official keys (saveable as ``{"model": state_dict}`` and loadable by
``build_model(checkpoint=...)``).
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "q_proj", "k_proj", "v_proj", "out_proj")
HEADS = "sam_mask_decoder"
_ADAPTER = "default"


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def lora_target_modules(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that :func:`add_lora` adapts.

    ``exclude``: name prefixes (submodules) to leave out.
    """
    names = []
    for name, module in model.named_modules():
        # the type check drops convolutions that share a suffix (memory_encoder.out_proj, patch_embed.proj)
        if not isinstance(module, nn.Linear):
            continue
        if any(name == p or name.startswith(p + ".") for p in exclude):
            continue
        if any(_matches(name, s) for s in LORA_TARGETS):
            names.append(name)
    return names


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    train_heads: bool = False,
    exclude: tuple[str, ...] = (),
) -> nn.Module:
    """Wrap the attention projections of ``model`` (in place) in LoRA adapters of rank ``rank``.

    Parameters
    ----------
    model
        A SAM2 network (``build_model``); modified in place and returned.
    rank
        LoRA rank r (> 0).
    alpha
        LoRA alpha; the update is scaled by ``alpha / rank``. Default ``rank`` (scale 1).
    dropout
        Dropout on the adapters' input (training mode only).
    train_heads
        Also train the whole mask decoder (``sam_mask_decoder``), which then gets no adapters: its
        own projection weights are trained directly.
    exclude
        Module prefixes that get no adapters (e.g. ``("image_encoder",)`` keeps the encoder as it is).

    Every other parameter is frozen. The adapters are kept in float32 even when the network
    computes in bfloat16, so that small updates are not rounded away; peft casts their input and
    output to and from the layer's dtype.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}.")
    if _lora_layers(model):
        raise ValueError("the model already has LoRA adapters: merge_lora() it first.")
    targets = lora_target_modules(model, exclude=tuple(exclude) + ((HEADS,) if train_heads else ()))
    if not targets:
        raise ValueError("no attention projection found to adapt: is this a SAM2 network?")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
    )
    model = inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    for name, param in model.named_parameters():
        if _is_lora_param(name):
            param.data = param.data.float()
            param.requires_grad_(True)
        else:
            param.requires_grad_(train_heads and name.startswith(HEADS + "."))
    return model


def merge_lora(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain SAM2 of an adapted ``model``, with each adapter merged into its layer's weight.

    Returns a copy unless ``inplace`` (the adapted model stays usable, e.g. to keep training after a
    checkpoint). The result has exactly the official state-dict keys and, like a freshly built model,
    every parameter trainable.
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge.")
    with torch.no_grad():
        for name, layer in layers:
            # safe_merge: a diverged adapter (nan/inf) raises instead of silently poisoning the weights
            layer.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora_trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters :func:`add_lora` left trainable (adapters, plus the mask decoder
    with ``train_heads``), in ``named_parameters`` order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]
