"""The prompts in napari's layers, as the predictor takes them, and what changed since the last time.

Points (features ``obj_id``, ``positive``) and rectangles (feature ``obj_id``) are read from layer
data in the GUI thread (a cheap copy); painted masks chosen with "use as mask prompt" are kept by
the annotator. One :class:`FramePrompt` per (frame, object); its :meth:`FramePrompt.signature` tells
whether the predictor already has it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..prompts import clip_box, clip_points
from .stack_view import StackView

__all__ = ["FramePrompt", "collect_prompts", "diff_prompts", "feature_column"]


@dataclass
class FramePrompt:
    """The prompts of one object on one frame: clicks (y, x), their signs, a box, a painted mask."""

    points: list[tuple[float, float]] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # y0, x0, y1, x1
    mask: np.ndarray | None = None  # (H, W) bool
    mask_digest: str | None = None

    @property
    def has_clicks(self) -> bool:
        return bool(self.points) or self.box is not None

    def signature(self) -> tuple:
        box = None if self.box is None else tuple(round(float(v), 3) for v in self.box)
        clicks = tuple((round(y, 3), round(x, 3), p) for (y, x), p in zip(self.points, self.positive))
        return clicks, box, self.mask_digest

    def xy_points(self, height: int, width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The clicks as (N, 2) x, y pairs clipped to the frame, and their labels (1 positive, 0 negative)."""
        if not self.points:
            return None, None
        yx = np.asarray(self.points, dtype=float).reshape(-1, 2)
        return clip_points(yx[:, ::-1], height, width), np.asarray(self.positive, dtype=np.int32)

    def xyxy_box(self, height: int, width: int) -> list[float] | None:
        if self.box is None:
            return None
        y0, x0, y1, x1 = self.box
        return clip_box((x0, y0, x1, y1), height, width)


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, bool)).tobytes() + str(mask.shape).encode()).hexdigest()


def feature_column(layer, name: str, default, n: int) -> np.ndarray:
    """A layer feature as an array of ``n`` values (``default`` when the layer has no such feature)."""
    features = getattr(layer, "features", None)
    if features is not None and name in features:
        return features[name].to_numpy()
    return np.full(n, default)


def collect_prompts(view: StackView, points=None, boxes=None,
                    masks: dict[tuple[int, int], np.ndarray] | None = None) -> dict[tuple[int, int], FramePrompt]:
    """``(t, obj) -> FramePrompt`` from a Points layer, a Shapes layer of rectangles and painted masks.

    Prompts on another slice of a fixed axis, or outside the video, are not this video's.
    """
    prompts: dict[tuple[int, int], FramePrompt] = {}
    if points is not None and len(points.data):
        n = len(points.data)
        ids = feature_column(points, "obj_id", 1, n)
        signs = feature_column(points, "positive", True, n)
        for coord, obj, sign in zip(np.asarray(points.data), ids, signs):
            t = view.frame_of(coord)
            if t is None or int(obj) < 1:
                continue
            entry = prompts.setdefault((t, int(obj)), FramePrompt())
            entry.points.append(view.yx(coord))
            entry.positive.append(bool(sign))
    if boxes is not None and len(boxes.data):
        ids = feature_column(boxes, "obj_id", 1, len(boxes.data))
        for corners, obj in zip(boxes.data, ids):
            corners = np.asarray(corners, dtype=float)
            t = view.frame_of(corners[0])
            if t is None or int(obj) < 1:
                continue
            ya, xa = view.lead, view.lead + 1
            entry = prompts.setdefault((t, int(obj)), FramePrompt())
            entry.box = (corners[:, ya].min(), corners[:, xa].min(), corners[:, ya].max(), corners[:, xa].max())
    for (t, obj), mask in (masks or {}).items():
        entry = prompts.setdefault((int(t), int(obj)), FramePrompt())
        entry.mask = np.asarray(mask, bool)
        entry.mask_digest = mask_digest(entry.mask)
    return prompts


def diff_prompts(applied: dict[tuple[int, int], tuple], prompts: dict[tuple[int, int], FramePrompt]
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(changed or new, removed) (frame, object) keys, sorted."""
    changed = sorted(k for k, v in prompts.items() if applied.get(k) != v.signature())
    removed = sorted(set(applied) - set(prompts))
    return changed, removed
