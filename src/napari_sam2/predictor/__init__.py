"""Predictors: video (PVS), single image, and the automatic mask generator."""

from .amg import AutomaticMaskGenerator
from .image import ImagePredictor
from .video import VideoPredictor, VideoState, build_video_predictor

__all__ = ["VideoPredictor", "VideoState", "build_video_predictor", "ImagePredictor", "AutomaticMaskGenerator"]
