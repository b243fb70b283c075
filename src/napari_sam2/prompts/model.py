"""The prompt model: one :class:`Prompt` per (frame, object), :class:`Prompts` for a whole stack.

This module knows nothing about tables or files (:mod:`.tables` and :mod:`.files` build on it). It
holds the checks against the stack, the hand-over to a SAM2 video predictor and
:func:`clip_points`, the one place where clicks are clipped to the frame (the napari widget uses
it too).

Coordinates follow napari: ``(t, y, x)``; :class:`Prompt` converts them to the ``(x, y)`` order of
the SAM2 video predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PromptError", "Prompt", "Prompts", "clip_box", "clip_points"]


class PromptError(ValueError):
    """Prompts that cannot be used: wrong shape, missing columns, outside the stack, ..."""


@dataclass
class Prompt:
    """Everything given for one object on one frame.

    Attributes
    ----------
    t, obj_id : int
        Frame index and object id (>= 1; it becomes the label value).
    points : numpy.ndarray, (N, 2) float
        Clicks as ``(y, x)`` pixel coordinates (napari order).
    positive : numpy.ndarray, (N,) bool
        True for a click on the object, False for a click on background.
    box : tuple of 4 float or None
        ``(y0, x0, y1, x1)``.
    mask : numpy.ndarray (Y, X) bool or None
    point_sources, box_source, mask_source
        Where each click, the box and the mask came from (e.g. ``"points row 3"``), for errors.
    """

    t: int
    obj_id: int
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    point_sources: list[str] = field(default_factory=list)
    box_source: str | None = None
    mask_source: str | None = None

    @property
    def source(self) -> str:
        """Where the prompt came from (its first row), for error messages."""
        for s in (self.box_source, self.mask_source, *self.point_sources):
            if s:
                return s
        return f"prompt for object {self.obj_id} on frame {self.t}"

    def xy_points(self) -> np.ndarray | None:
        """The clicks as ``(x, y)`` pairs, the order of the SAM2 predictor (None if no click)."""
        if len(self.points) == 0:
            return None
        return np.ascontiguousarray(self.points[:, ::-1], dtype=np.float32)

    def xyxy_box(self) -> list[float] | None:
        """The box as ``[x0, y0, x1, y1]``, the order of the SAM2 predictor."""
        if self.box is None:
            return None
        y0, x0, y1, x1 = self.box
        return [x0, y0, x1, y1]


def clip_box(box, height: int, width: int) -> list[float]:
    """An ``(x0, y0, x1, y1)`` box with its corners clipped to the frame (``0..width``, ``0..height``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def clip_points(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip clicks in the predictor's ``(x, y)`` order to the frame.

    The predictor scales clicks by the frame size, so a click off the frame (napari lets one land
    anywhere, and :meth:`Prompts.check` accepts half a pixel beyond the centres of the border
    pixels) would point outside the image; clipping puts it on the frame's edge instead.

    Parameters
    ----------
    points : numpy.ndarray, (N, 2)
        Clicks as ``(x, y)`` pairs, as :meth:`Prompt.xy_points` returns them (not napari's
        ``(y, x)``).
    height, width : int
        Frame size in pixels: ``y`` is clipped to ``0 .. height`` and ``x`` to ``0 .. width``.

    Returns
    -------
    numpy.ndarray, (N, 2)
        A clipped copy, same dtype as ``points``; ``points`` itself is left unchanged.
    """
    out = np.array(points, copy=True)
    out[:, 0] = np.clip(out[:, 0], 0, width)
    out[:, 1] = np.clip(out[:, 1], 0, height)
    return out


class Prompts:
    """All prompts of one stack, one :class:`Prompt` per (frame, object).

    Build with :func:`build_prompts`; check against the stack with :meth:`check`; give them to a
    video predictor with :meth:`apply`.
    """

    def __init__(self, items: dict[tuple[int, int], Prompt] | None = None):
        self.items: dict[tuple[int, int], Prompt] = dict(items or {})

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items[k] for k in sorted(self.items))

    def __repr__(self) -> str:
        return f"Prompts({len(self.items)} prompts, objects {self.obj_ids}, frames {self.frames})"

    @property
    def obj_ids(self) -> list[int]:
        return sorted({o for _, o in self.items})

    @property
    def frames(self) -> list[int]:
        return sorted({t for t, _ in self.items})

    def get_or_add(self, t: int, obj_id: int) -> Prompt:
        """The prompt of object ``obj_id`` on frame ``t``, added empty if there is none yet.

        Parameters
        ----------
        t, obj_id : int
            Frame index and object id.

        Returns
        -------
        Prompt
            The stored prompt (changes to it change these prompts).
        """
        key = (int(t), int(obj_id))
        if key not in self.items:
            self.items[key] = Prompt(t=int(t), obj_id=int(obj_id))
        return self.items[key]

    def check(self, n_frames: int, height: int, width: int) -> None:
        """Raise :class:`PromptError` naming the first prompt outside the ``(T, Y, X)`` stack.

        A click or box corner may lie anywhere on the frame's pixels, i.e. within
        ``-0.5 .. Y - 0.5`` and ``-0.5 .. X - 0.5`` (pixel centres are integers, as in napari).
        """
        shape = f"the stack is {n_frames} frames of {height} x {width} (Y x X) pixels"
        for p in self:
            src = p.source
            if not 0 <= p.t < n_frames:
                raise PromptError(f"{src}: frame t={p.t} is outside the stack: {shape} (frames 0..{n_frames - 1})")
            for i, (y, x) in enumerate(p.points):
                if not (-0.5 <= y <= height - 0.5 and -0.5 <= x <= width - 0.5):
                    where = p.point_sources[i] if i < len(p.point_sources) else src
                    raise PromptError(f"{where}: point (y={y:g}, x={x:g}) on frame {p.t} lies outside the frame: {shape}")
            if p.box is not None:
                y0, x0, y1, x1 = p.box
                if not (-0.5 <= y0 and y1 <= height - 0.5 and -0.5 <= x0 and x1 <= width - 0.5):
                    raise PromptError(
                        f"{p.box_source or src}: box (y0={y0:g}, x0={x0:g}, y1={y1:g}, x1={x1:g}) on frame {p.t} reaches outside the frame: {shape}"
                    )
            if p.mask is not None and p.mask.shape != (height, width):
                raise PromptError(f"{src}: the mask label image has shape {p.mask.shape} but the stack's frames are {(height, width)} (Y, X)")

    def apply(self, predictor, state, width: int, height: int) -> None:
        """Add every prompt to a :class:`~napari_sam2.VideoPredictor` session.

        Clicks and boxes are turned from napari ``(y, x)`` into the predictor's ``(x, y)`` and clipped
        to the frame; a mask prompt goes to ``add_new_mask``.
        """
        for p in self:
            if p.mask is not None:
                predictor.add_new_mask(state, frame_idx=p.t, obj_id=p.obj_id, mask=p.mask)
                continue
            pts = p.xy_points()
            labels = None
            if pts is not None:
                pts = clip_points(pts, height, width)
                labels = p.positive.astype(np.int32)
            box = p.xyxy_box()
            if box is not None:
                box = clip_box(box, height, width)
            predictor.add_new_points_or_box(state, frame_idx=p.t, obj_id=p.obj_id, points=pts, labels=labels, box=box)

