"""Objects found by the automatic mask generator on one frame: the seeds of a session.

Used wherever cells are found without a prompt: ``segment_stack(auto=...)`` and ``--auto`` (the first
frame), the lineage tracker (cells entering the field) and the widget's "Segment all cells on this
frame". The stack's intensity range is used for a single-channel frame, as the video predictor does,
so a 16-bit frame is seen as it is when tracked.
"""

from __future__ import annotations

import numpy as np

from .amg import AutomaticMaskGenerator
from .generator_parameters import generator_parameters

__all__ = ["FrameSeeder"]


class FrameSeeder:
    """``seeder(image)`` -> the masks found on ``image``, best predicted IoU first (at most ``max_objects``)."""

    def __init__(self, model, auto: dict | None = None, intensity_range: tuple[float, float] | None = None,
                 rgb: bool = False):
        params, self.max_objects = generator_parameters(auto)
        if not rgb and params.get("intensity_range") is None:
            params["intensity_range"] = intensity_range
        self.generator = AutomaticMaskGenerator(model, **params)

    def __call__(self, image) -> list[np.ndarray]:
        image = np.asarray(image.compute() if hasattr(image, "compute") else image)
        records = sorted(self.generator.generate(image), key=lambda r: -r["predicted_iou"])
        if self.max_objects is not None:
            records = records[: self.max_objects]
        return [np.asarray(r["segmentation"], bool) for r in records]
