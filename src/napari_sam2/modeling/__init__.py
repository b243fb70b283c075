"""The SAM2 network: one module per component of the paper.

The configs load without torch (the command line reads them to parse its options); the network
itself is imported on first use.
"""

from .configs import CONFIGS, DEFAULT_MODEL, SAM2Config, get_config

__all__ = ["CONFIGS", "DEFAULT_MODEL", "SAM2Config", "get_config", "SAM2", "FrameFeatures"]


def __getattr__(name: str):
    if name in ("SAM2", "FrameFeatures"):
        from . import sam2

        return getattr(sam2, name)
    raise AttributeError(f"module 'napari_sam2.modeling' has no attribute {name!r}")
