"""The SAM2 network: one module per component of the paper."""

from .configs import CONFIGS, SAM2Config, get_config
from .sam2 import SAM2, FrameFeatures

__all__ = ["CONFIGS", "SAM2Config", "get_config", "SAM2", "FrameFeatures"]
