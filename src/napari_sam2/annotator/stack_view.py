"""Which image is segmented, and how its (T, Y, X) video maps into the layers' coordinates."""

from __future__ import annotations

import numpy as np

__all__ = ["StackView", "layer_array"]

_LEADING_NAMES = {1: ("t",), 2: ("t", "z"), 3: ("c", "t", "z")}


def layer_array(layer):
    """The full-resolution data of an image layer (level 0 of a multiscale one)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


class StackView:
    """The video of an image layer along ``axis``, the other leading axes fixed at ``fixed``.

    A 2D image (or an RGB one) is a video of one frame: the frame alone is segmented. A ``(T, Y, X)``
    layer is a video along axis 0; a 4D layer along the chosen axis, at the slice in view of the other.
    """

    def __init__(self, layer, axis: int = 0, fixed: dict[int, int] | None = None):
        self.layer = layer
        self.name = str(layer.name)
        data = layer_array(layer)
        self.rgb = bool(getattr(layer, "rgb", False))
        self.shape = tuple(int(s) for s in data.shape)
        spatial = 3 if self.rgb else 2
        self.lead = len(self.shape) - spatial
        if self.lead < 0:
            raise ValueError(f"image '{self.name}' has shape {self.shape}: it needs at least Y and X axes")
        self.axis = int(axis) if self.lead else 0
        if self.lead and not 0 <= self.axis < self.lead:
            raise ValueError(f"axis {axis} is not a leading axis of image '{self.name}' (shape {self.shape})")
        self.fixed = {d: int(i) for d, i in (fixed or {}).items() if d != self.axis and d < self.lead}
        if self.lead:
            index = tuple(slice(None) if d == self.axis else self.fixed.get(d, 0) for d in range(self.lead))
            self.video = data[index]
            self.n_frames = self.shape[self.axis]
        else:
            self.video = data[None]  # one frame
            self.n_frames = 1
        self.height, self.width = self.shape[self.lead], self.shape[self.lead + 1]
        self.labels_shape = self.shape[: self.lead + 2]

    @property
    def axes(self) -> str:
        """The video's axes as the predictor reads them."""
        return "TYXC" if self.rgb else "TYX"

    @property
    def ndim(self) -> int:
        """Dimensions of the labels, points and boxes layers."""
        return len(self.labels_shape)

    def same_as(self, other: StackView | None) -> bool:
        return (other is not None and other.layer is self.layer and other.axis == self.axis
                and other.fixed == self.fixed and other.shape == self.shape)

    # ---------------------------------------------------------------- coordinates
    def frame_index(self, t: int) -> tuple:
        """Index of frame t in the labels layer's data."""
        return tuple(int(t) if d == self.axis else self.fixed.get(d, 0) for d in range(self.lead))

    def frame_of(self, coord) -> int | None:
        """The frame of a layer coordinate (None when it lies on another slice of a fixed axis)."""
        if not self.lead:
            return 0
        for d, i in self.fixed.items():
            if int(round(float(coord[d]))) != i:
                return None
        t = int(round(float(coord[self.axis])))
        return t if 0 <= t < self.n_frames else None

    def yx(self, coord) -> tuple[float, float]:
        return float(coord[self.lead]), float(coord[self.lead + 1])

    def point(self, t: int, y: float, x: float) -> np.ndarray:
        """A layer coordinate of pixel (y, x) on frame t."""
        return np.array([*self.frame_index(t), y, x], dtype=float)

    def labels_video(self, labels_data):
        """The (T, Y, X) view of the labels layer's data for this video."""
        if not self.lead:
            return labels_data[None]
        index = tuple(slice(None) if d == self.axis else self.fixed.get(d, 0) for d in range(self.lead))
        return labels_data[index]

    # ---------------------------------------------------------------- geometry of the layers made
    def geometry(self) -> dict:
        """``scale``, ``translate`` and ``axis_labels`` for the layers the plugin adds over this image."""
        n = self.ndim
        layer = self.layer
        geometry = {"scale": tuple(layer.scale[:n]), "translate": tuple(layer.translate[:n])}
        labels = tuple(getattr(layer, "axis_labels", ()) or ())[:n]
        if len(labels) != n or all(str(a).startswith("axis ") or str(a).lstrip("-").isdigit() for a in labels):
            labels = (*_LEADING_NAMES.get(self.lead, tuple(f"axis {d}" for d in range(self.lead))), "y", "x")
        geometry["axis_labels"] = tuple(str(a) for a in labels)
        units = tuple(getattr(layer, "units", ()) or ())[:n]
        if len(units) == n:
            geometry["units"] = units
        return geometry

    def describe(self) -> str:
        if not self.lead:
            return f"'{self.name}' (one 2D image: the frame alone is segmented)"
        return f"'{self.name}' ({self.n_frames} frames along axis {self.axis})"
