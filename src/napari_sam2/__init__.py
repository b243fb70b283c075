"""napari-sam2: SAM2 (Segment Anything in Images and Videos) for microscopy time-lapses.

The public API is imported lazily, so that ``napari_sam2.io`` (readers, writers) and the napari
manifest load without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "segment_stack": "napari_sam2.api",
    "embed_stack": "napari_sam2.api",
    "SegmentationResult": "napari_sam2.api",
    "build_model": "napari_sam2.build",
    "build_video_predictor": "napari_sam2.predictor.video",
    "VideoPredictor": "napari_sam2.predictor.video",
    "ImagePredictor": "napari_sam2.predictor.image",
    "AutomaticMaskGenerator": "napari_sam2.predictor.amg",
    "SAM2": "napari_sam2.modeling.sam2",
    "CONFIGS": "napari_sam2.modeling.configs",
    "finetune": "napari_sam2.train.loop",
    "open_training_data": "napari_sam2.train.data",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'napari_sam2' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
