"""Build a SAM2 network by registry name, with the official weights."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from .checkpoints import load_state_dict, load_weights, resolve_checkpoint
from .modeling import DEFAULT_MODEL, SAM2, get_config
from .precision import DTYPES, resolve_precision

log = logging.getLogger("napari_sam2")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'.")
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={device!r} was asked for but Apple MPS is not available here; use 'cpu' or 'auto'.")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r}: napari-sam2 runs on 'cpu', 'cuda' or 'mps'.")
    return dev


def build_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    pretrained: bool = True,
    download: bool = True,
    image_size: int | None = None,
    precision: str = "auto",
) -> SAM2:
    """The SAM2 network ``name`` (e.g. ``"sam2.1_hiera_tiny"``, ``"sam2_hiera_large"``) in eval mode.

    Parameters
    ----------
    checkpoint
        A checkpoint file in the official layout (``{"model": state_dict}`` or a bare state dict).
        ``None``: the official file, from the local cache or ``./model/``, downloaded if missing.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    pretrained
        ``False`` builds the network with untrained weights (for tests), ignoring ``checkpoint``.
    download
        Allow downloading the official checkpoint when it is not found locally.
    image_size
        Input size of the network (default 1024, what SAM2 was trained at; a multiple of 64). Smaller
        sizes run much faster on small images at some cost in accuracy.
    precision
        ``"fp32"`` (exact: the reference's numbers), ``"bf16"`` (image encoder, memory attention and
        memories in bfloat16; masks within IoU 0.98 of fp32) or ``"auto"`` (default): bf16 where the
        device computes it natively (CUDA compute capability >= 8, CPUs with AMX or AVX-512 BF16),
        else fp32. ``$NAPARI_SAM2_PRECISION`` pins what ``auto`` means.
    """
    cfg = get_config(name)
    if image_size is not None and image_size != cfg.image_size:
        if image_size <= 0 or image_size % 64:
            raise ValueError(f"image_size must be a positive multiple of 64, got {image_size}.")
        cfg = dataclasses.replace(cfg, image_size=int(image_size))
    model = SAM2(cfg)
    if pretrained:
        path = resolve_checkpoint(name, checkpoint, download=download)
        load_weights(model, load_state_dict(path), name, source=path)
    dev = resolve_device(device)
    chosen, why = resolve_precision(precision, dev)
    model.set_precision(DTYPES[chosen])
    log.info("%s runs on %s in %s (%s)", name, dev, chosen, why)
    return model.to(dev).eval()
