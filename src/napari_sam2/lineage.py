"""Cells that enter the field and cells that divide, during SAM2 propagation.

SAM2 tracks the objects it was prompted with. :func:`napari_sam2.segment_stack` can extend the set
while it propagates forward (see ``docs/tracking.md``):

- **new objects** (:class:`NewObjectParams`): every ``every`` frames after the first, the automatic
  mask generator runs on the frame; a mask that is new (IoU with every existing masklet below
  ``iou_threshold`` and at most ``max_covered`` of its pixels already labelled) and of plausible size
  (``min_area <= area <= max_area``) becomes a new object: a new id with that mask as its prompt on
  that frame.
- **divisions** (:class:`DivisionParams`): a masklet whose mask falls apart into two connected
  components, the smaller at least ``size_ratio`` of the larger and at least ``min_area`` pixels, on
  ``persist`` consecutive frames, has divided on the first of them: the parent ends on the frame
  before, two daughters (new ids, the two parts as mask prompts) start there, and ``parent`` records
  the lineage.

- **ended tracks**: a divided parent is ended on its daughters' first frame
  (``VideoPredictor.end_object``): from there on it is neither tracked nor drawn and its memory is
  released, so the cost per frame follows the live cells, not every cell ever seen. Daughters are full
  objects: they can leave, be occluded, be found again and divide again, to any depth.
- **cells that leave** (``lost_after=K``): an object absent (no pixel on the frame: SAM2's object-present
  score below 0, or its mask lost to a neighbour) on K consecutive frames is ended on the first of them;
  its track ends on its last frame with pixels. A cell coming back after that is **not** re-identified:
  ``detect_new`` finds it as a new object, a new track without parent. Absences shorter than K frames
  stay in the track (SAM2 recovers occlusions); the CTC writer splits such a track at the gap, as the
  CTC requires.

Adding an object mid-video follows SAM2's rules: the running propagation stops at that frame, the
mask prompts are added, and propagation starts again from there (frames from there on are tracked
again, with every live object).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from .io.stack import Stack
from .labels import logits_to_labels
from .propagation import VideoPredictorLike

__all__ = ["NewObjectParams", "DivisionParams", "new_object_params", "division_params", "LineageTracker", "LOST_AFTER"]

LOST_AFTER = 5  # frames without a pixel after which a tracked cell has left (segment_stack's default)


@dataclass
class NewObjectParams:
    """When and what to add as a new object (cells entering the field, cells missed at the start).

    Attributes
    ----------
    every : int
        Look for new objects on frames ``start + every``, ``start + 2 * every``, ... of the forward
        pass (``start``: the first prompted / seeded frame, whose objects are the prompts).
    iou_threshold : float
        A candidate mask whose IoU with any existing masklet on that frame is >= this is not new.
    max_covered : float
        ... nor one with more than this fraction of its pixels already labelled.
    min_area, max_area : int
        Plausible size, pixels (``max_area=None``: no upper bound).
    max_objects : int
        Add no object (here or by a division) while this many are tracked (live, not ended).
    generator : dict
        Parameters of :class:`napari_sam2.AutomaticMaskGenerator` (as ``segment_stack(auto=...)``).
    mask_source : callable, optional
        ``mask_source(image, t) -> iterable of (Y, X) bool masks`` instead of the automatic mask
        generator (another detector, or a test double).
    """

    every: int = 5
    iou_threshold: float = 0.2
    max_covered: float = 0.3
    min_area: int = 20
    max_area: int | None = None
    max_objects: int = 1000
    generator: dict = field(default_factory=dict)
    mask_source: Callable[[np.ndarray, int], Iterable[np.ndarray]] | None = None

    def __post_init__(self) -> None:
        if int(self.every) < 1:
            raise ValueError(f"detect_new: every must be >= 1 frame, got {self.every}")
        if not 0 < float(self.iou_threshold) <= 1 or not 0 <= float(self.max_covered) <= 1:
            raise ValueError("detect_new: iou_threshold must be in (0, 1] and max_covered in [0, 1]")
        if int(self.min_area) < 1 or (self.max_area is not None and int(self.max_area) < int(self.min_area)):
            raise ValueError(f"detect_new: need 1 <= min_area <= max_area, got {self.min_area}, {self.max_area}")


@dataclass
class DivisionParams:
    """When a masklet that falls apart is a division.

    Attributes
    ----------
    min_area : int
        Each of the two parts has at least this many pixels.
    size_ratio : float
        The smaller part has at least this fraction of the larger's area ("comparable size").
    persist : int
        The split is seen on this many consecutive frames (a division starts on the first).
    max_objects : int
        No division while this many objects are tracked (live).
    neck : int
        Daughters that still touch: a masklet in one piece whose erosion by at most ``neck`` pixels
        leaves two parts (so joined by a neck at most ``2 * neck`` pixels wide) falls apart into them;
        the pixels go to the nearer part. 0: only parts that do not touch count. Erosion never splits a
        convex cell.
    """

    min_area: int = 10
    size_ratio: float = 0.3
    persist: int = 2
    max_objects: int = 1000
    neck: int = 2

    def __post_init__(self) -> None:
        if int(self.min_area) < 1 or not 0 < float(self.size_ratio) <= 1 or int(self.persist) < 1:
            raise ValueError("detect_divisions: need min_area >= 1, 0 < size_ratio <= 1 and persist >= 1, got "
                             f"{self.min_area}, {self.size_ratio}, {self.persist}")
        if int(self.neck) < 0:
            raise ValueError(f"detect_divisions: neck must be >= 0 pixels, got {self.neck}")


def _params(value: Any, cls, name: str, int_field: str | None = None):
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown {name} parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
        return cls(**value)
    if int_field is not None and isinstance(value, (int, np.integer)):
        return cls(**{int_field: int(value)})
    raise TypeError(f"{name} must be True/False, a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def new_object_params(value: Any) -> NewObjectParams | None:
    """``detect_new=`` of segment_stack: False/None (off), True, an int K (every K frames), a dict, or params."""
    return _params(value, NewObjectParams, "detect_new", int_field="every")


def division_params(value: Any) -> DivisionParams | None:
    """``detect_divisions=`` of segment_stack: False/None (off), True, a dict, or params."""
    return _params(value, DivisionParams, "detect_divisions")


def _two_largest(comp: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """Ids and areas of the two largest components of a label image with ``n >= 2`` components."""
    areas = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    return int(order[0]) + 1, int(order[1]) + 1, int(areas[order[0]]), int(areas[order[1]])


def _comparable(a1: int, a2: int, params: DivisionParams) -> bool:
    return a2 >= params.min_area and a2 >= params.size_ratio * a1


def _split(mask: np.ndarray, params: DivisionParams) -> tuple[np.ndarray, np.ndarray] | None:
    """The two largest parts of ``mask`` when they look like daughters, else None: connected parts, or
    (daughters still touching) the two parts an erosion of at most ``params.neck`` pixels leaves."""
    comp, n = ndimage.label(mask)
    if n >= 2:
        i1, i2, a1, a2 = _two_largest(comp, n)
        return (comp == i1, comp == i2) if _comparable(a1, a2, params) else None
    for depth in range(1, int(params.neck) + 1):
        core = ndimage.binary_erosion(mask, iterations=depth)
        comp, n = ndimage.label(core)
        if n == 0:
            return None
        if n < 2:
            continue
        i1, i2, _, _ = _two_largest(comp, n)
        seeds = np.where(comp == i1, 1, np.where(comp == i2, 2, 0))
        # every pixel of the mask goes to the nearer of the two cores
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        nearest = seeds[iy, ix]
        first, second = mask & (nearest == 1), mask & (nearest == 2)
        a1, a2 = int(first.sum()), int(second.sum())
        if a1 < a2:
            first, second, a1, a2 = second, first, a2, a1
        return (first, second) if _comparable(a1, a2, params) else None
    return None


class LineageTracker:
    """Forward propagation that adds entering cells and divisions and ends finished tracks (used by
    ``segment_stack`` and the napari annotator).

    ``emit(t, labels_t)`` is called for every frame yielded, again for frames tracked again after a
    restart (the later frame replaces the earlier). ``lost_after``: end an object absent on this many
    consecutive frames (None: never). ``steps[t]``: objects the predictor tracked on frame t (the cost).
    """

    def __init__(self, predictor: VideoPredictorLike, state, video: Stack, obj_ids: list[int], new: NewObjectParams | None,
                 divisions: DivisionParams | None, rgb: bool = False, lost_after: int | None = None):
        if lost_after is not None and int(lost_after) < 1:
            raise ValueError(f"lost_after must be >= 1 frame (or None: never end a lost object), got {lost_after}")
        self.run = predictor
        self.state = state
        self.video = video
        self.ids: list[int] = list(obj_ids)
        self.new = new
        self.div = divisions
        self.rgb = rgb
        self.lost_after = None if lost_after is None else int(lost_after)
        self.parents: dict[int, int] = {}
        self.ended: dict[int, int] = {}  # object -> first frame where it no longer exists
        self.steps: dict[int, int] = {}
        self.next_id = max(self.ids, default=0) + 1
        self._first: dict[int, int] = {}  # object -> first frame it was tracked on in this pass
        self._last: dict[int, int] = {}  # object -> last frame it had pixels on
        self._source = None

    # ------------------------------------------------------------------ helpers
    @property
    def live(self) -> list[int]:
        """Objects not ended (as of the furthest frame tracked)."""
        return [o for o in self.ids if o not in self.ended]

    def frame_labels(self, t: int, frame_ids, logits) -> np.ndarray:
        keep = [i for i, o in enumerate(frame_ids) if not (o in self.ended and t >= self.ended[o])]
        if len(keep) == len(frame_ids):
            return logits_to_labels(logits, frame_ids)
        return logits_to_labels(logits[keep], [frame_ids[i] for i in keep])

    def _room(self, limit: int, wanted: int) -> int:
        return max(0, min(wanted, int(limit) - len(self.live)))

    def _add(self, t: int, mask: np.ndarray, parent: int = 0) -> int:
        obj = self.next_id
        self.next_id += 1
        self.run.add_new_mask(self.state, frame_idx=t, obj_id=obj, mask=np.asarray(mask, bool))
        self.ids.append(obj)
        if parent:
            self.parents[obj] = parent
        return obj

    def _end(self, obj: int, t: int) -> bool:
        """End ``obj`` on frame t in the predictor; False when it cannot end there (a prompt on or after t)."""
        try:
            self.run.end_object(self.state, obj, t)
        except ValueError:
            return False
        self.ended[obj] = t
        return True

    def adopt(self, obj_ids) -> None:
        """Take in what the user changed while the pass ran: objects added, ended ones prompted again."""
        obj_ids = list(obj_ids)
        known = set(self.ids)
        self.ids += [o for o in obj_ids if o not in known]
        self.next_id = max([self.next_id, *(o + 1 for o in self.ids)])
        track_end = getattr(self.state, "track_end", None)
        if track_end is not None:
            present = set(obj_ids)
            self.ended = {o: t for o, t in self.ended.items() if o not in present or track_end(o) is not None}

    def _masks(self, t: int) -> list[np.ndarray]:
        image = self.video.data[t]
        image = np.asarray(image.compute() if hasattr(image, "compute") else image)
        if self.new.mask_source is not None:
            return [np.asarray(m, bool) for m in self.new.mask_source(image, t)]
        if self._source is None:
            from .predictor.seeding import FrameSeeder

            self._source = FrameSeeder(self.run.model, self.new.generator,
                                       getattr(self.state, "intensity_range", None), rgb=self.rgb)
        return self._source(image)

    # ------------------------------------------------------------------ detection
    def find_new(self, t: int, frame: np.ndarray) -> list[np.ndarray]:
        """Masks on frame ``t`` that are new objects of plausible size."""
        p = self.new
        areas = np.bincount(frame.ravel()) if frame.size else np.zeros(1, np.int64)
        taken = frame > 0
        accepted: list[np.ndarray] = []
        for mask in self._masks(t):
            if mask.shape != frame.shape:
                raise ValueError(f"a new-object mask has shape {mask.shape}, the frame {frame.shape}")
            area = int(mask.sum())
            if area < p.min_area or (p.max_area is not None and area > p.max_area):
                continue
            if (mask & taken).sum() > p.max_covered * area:
                continue
            ids, inter = np.unique(frame[mask], return_counts=True)
            ious = [c / (area + areas[i] - c) for i, c in zip(ids.tolist(), inter.tolist()) if i]
            if ious and max(ious) >= p.iou_threshold:
                continue
            if any((mask & m).sum() / (mask | m).sum() >= p.iou_threshold for m in accepted):
                continue
            accepted.append(mask)
            taken = taken | mask
        return accepted

    def find_split(self, t: int, frame: np.ndarray, candidates: dict) -> tuple[int, int, tuple] | None:
        """Update the split candidates with frame ``t``; a confirmed division ``(obj, first, parts)``."""
        p = self.div
        splits = {}
        boxes = ndimage.find_objects(frame)
        for obj in np.unique(frame).tolist():
            if obj == 0 or obj > len(boxes) or boxes[obj - 1] is None:
                continue
            sl = boxes[obj - 1]
            parts = _split(frame[sl] == obj, p)
            if parts is not None:
                full = []
                for part in parts:
                    m = np.zeros(frame.shape, bool)
                    m[sl] = part
                    full.append(m)
                splits[obj] = tuple(full)
        for obj in list(candidates):
            if obj not in splits:
                del candidates[obj]
        for obj, parts in splits.items():
            c = candidates.get(obj)
            if c is None or not (c["first"] <= t <= c["last"] + 1):
                c = candidates[obj] = {"first": t, "last": t, "parts": parts}
            c["last"] = max(c["last"], t)
            if c["last"] - c["first"] + 1 >= p.persist and self._room(p.max_objects, 2) == 2:
                del candidates[obj]
                return obj, c["first"], c["parts"]
        return None

    def _note_absences(self, t: int, frame_ids, frame: np.ndarray) -> None:
        """End the objects without a pixel on the last ``lost_after`` frames, from their first empty frame."""
        if self.lost_after is None:
            return
        drawn = set(np.unique(frame).tolist())
        for obj in frame_ids:
            if obj in self.ended:
                continue
            first = self._first.setdefault(obj, t)
            if obj in drawn:
                self._last[obj] = t
                continue
            gone = t - self._last.get(obj, first - 1)
            if gone >= self.lost_after:
                self._end(obj, t - gone + 1)  # its frames since are empty already: nothing to redraw

    def _forget_from(self, t: int) -> None:
        """Frames from t on are tracked again: what was seen there no longer counts."""
        self._first = {o: f for o, f in self._first.items() if f < t}
        self._last = {o: f for o, f in self._last.items() if f < t}

    # ------------------------------------------------------------------ the pass
    def propagate(self, start: int, emit: Callable[[int, np.ndarray], Any]) -> None:
        """Track forward from ``start`` to the last frame, adding and ending objects on the way."""
        t0 = int(start)
        checked: set[int] = set()
        candidates: dict[int, dict] = {}
        while True:
            restart = None
            frames = self.run.propagate_in_video(self.state, start_frame_idx=t0)
            try:
                for t, frame_ids, logits in frames:
                    self.steps[t] = len(frame_ids)
                    frame = self.frame_labels(t, frame_ids, logits)
                    emit(t, frame)
                    if self.div is not None:
                        found = self.find_split(t, frame, candidates)
                        if found is not None and self._end(found[0], found[1]):
                            obj, first, parts = found
                            for part in parts:
                                self._add(first, part, parent=obj)
                            restart = first
                            break
                    self._note_absences(t, frame_ids, frame)
                    if (self.new is not None and t > start and (t - start) % self.new.every == 0
                            and t not in checked):
                        checked.add(t)
                        room = self._room(self.new.max_objects, 1 << 30)
                        masks = self.find_new(t, frame)[:room] if room else []
                        if masks:
                            for mask in masks:
                                self._add(t, mask)
                            restart = t
                            break
            finally:
                close = getattr(frames, "close", None)
                if close is not None:
                    close()
            if restart is None:
                return
            t0 = restart
            self._forget_from(restart)

    def scores(self, n_frames: int) -> dict[int, np.ndarray]:
        """Object-present logits per object; NaN from an ended track's end on."""
        out = {}
        for obj in self.ids:
            s = np.array(self.state.object_score_logits(obj), dtype=np.float32, copy=True)
            if obj in self.ended:
                s[self.ended[obj]:] = np.nan
            out[obj] = s
        return out
