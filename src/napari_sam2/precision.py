"""Which floating-point precision the network computes in: fp32 (exact, the reference's numbers) or bf16.

bf16 halves memory traffic and runs 2-6x faster where the hardware has bf16 arithmetic (CUDA GPUs of
compute capability 8 and later, CPUs with AMX or AVX-512 BF16); elsewhere it is emulated and several
times slower than fp32, so ``"auto"`` only picks it where it pays.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "NAPARI_SAM2_PRECISION"  # pins what "auto" means, e.g. for a reproducible pipeline
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

log = logging.getLogger("napari_sam2")


def cpu_bf16_features() -> list[str]:
    """The fast-bf16 instruction sets of this CPU: a subset of ``["amx_bf16", "avx512_bf16"]``."""
    found = []
    try:
        if torch.cpu._is_amx_tile_supported():
            found.append("amx_bf16")
        if torch.cpu._is_avx512_bf16_supported():
            found.append("avx512_bf16")
    except AttributeError:  # an older torch: read the kernel's view of the CPU
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        found = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return found


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what that was decided from (for the log line)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if major >= 8:
            return True, f"{name}, compute capability {major}.{minor}"
        return False, f"{name}, compute capability {major}.{minor} < 8 emulates bf16"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, "this CPU has " + " and ".join(f.upper().replace("_", "-") for f in features)
        return False, "this CPU has neither AMX nor AVX-512 BF16"
    return False, f"bf16 is not measured to pay on {device.type}"


def resolve_precision(precision: str | torch.dtype | None, device: torch.device) -> tuple[str, str]:
    """``(precision, why)`` with precision ``"fp32"`` or ``"bf16"``.

    ``"auto"`` (or None): bf16 where the device computes it natively, else fp32; the environment
    variable ``NAPARI_SAM2_PRECISION`` (``fp32`` / ``bf16``) overrides what ``auto`` picks.
    """
    if isinstance(precision, torch.dtype):
        precision = next((k for k, v in DTYPES.items() if v == precision), str(precision))
    precision = "auto" if precision is None else str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    native, why = fast_bf16(device)
    if precision == "auto":
        pinned = os.environ.get(PRECISION_ENV, "").strip().lower()
        if pinned and pinned != "auto":
            if pinned not in DTYPES:
                raise ValueError(f"${PRECISION_ENV} must be fp32, bf16 or auto, got {pinned!r}.")
            return pinned, f"${PRECISION_ENV}={pinned}"
        return ("bf16" if native else "fp32"), f"auto: {why}"
    if precision == "bf16" and not native:
        warnings.warn(
            f"precision='bf16' on {device.type}: {why}, so bf16 is emulated and will be slow (several times "
            "slower than fp32 on such CPUs). Use precision='auto' or 'fp32' here.",
            RuntimeWarning,
            stacklevel=3,
        )
    return precision, "asked for"
