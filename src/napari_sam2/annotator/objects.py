"""The objects of a session as the object list shows them: where each is, and how sure SAM2 is of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ObjectInfo", "ObjectPresence"]


@dataclass
class ObjectInfo:
    """One row of the object list.

    ``scores``: the object-present logit per frame (> 0: SAM2 sees the object; <= 0: occluded or
    gone; NaN: not computed yet). ``first`` / ``last``: frames where its label is drawn.
    """

    obj_id: int
    first: int | None
    last: int | None
    scores: np.ndarray
    parent: int = 0

    @property
    def absent_frames(self) -> list[int]:
        """Frames where SAM2 judged the object absent (occlusions, leaving the field)."""
        return np.flatnonzero(np.nan_to_num(self.scores, nan=1.0) <= 0).tolist()

    @property
    def frames_drawn(self) -> str:
        return "-" if self.first is None else f"{self.first}..{self.last}"


@dataclass
class ObjectPresence:
    """Which frames each object's label was written on, kept up to date frame by frame."""

    frames: dict[int, set[int]] = field(default_factory=dict)

    def update(self, t: int, labels: np.ndarray) -> None:
        present = set(np.unique(labels).tolist()) - {0}
        for obj in present:
            self.frames.setdefault(obj, set()).add(int(t))
        for obj, where in self.frames.items():
            if obj not in present:
                where.discard(int(t))

    def drop(self, obj: int) -> None:
        self.frames.pop(obj, None)

    def clear(self) -> None:
        self.frames.clear()

    def span(self, obj: int) -> tuple[int | None, int | None]:
        where = self.frames.get(obj)
        return (min(where), max(where)) if where else (None, None)

    def rows(self, ids, scores, parents: dict[int, int]) -> list[ObjectInfo]:
        """The object list for the objects ``ids``, with ``scores[obj]`` per frame."""
        return [ObjectInfo(int(obj), *self.span(obj), np.asarray(scores[obj], dtype=np.float32),
                           int(parents.get(obj, 0))) for obj in sorted(ids)]
