"""Which propagation passes to run over a video, and running them: one plan for every door.

The notebook API, the batch CLI (through it) and the napari widget all track objects the same way:
forward from the earliest prompted frame of a range to its end, and/or backward from the latest
prompted frame to its start.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["DIRECTIONS", "Pass", "VideoPredictorLike", "plan_passes", "needs_history", "run_passes"]

DIRECTIONS = ("both", "forward", "backward")


@dataclass(frozen=True)
class Pass:
    """One propagation pass: from frame ``start``, ``count`` more frames, backward if ``reverse``."""

    start: int
    count: int
    reverse: bool

    @property
    def frames(self) -> int:
        """How many frames the pass delivers (its start included)."""
        return self.count + 1


def plan_passes(direction: str, prompted: Sequence[int], lo: int, hi: int, backward_first: bool = False) -> list[Pass]:
    """The passes over frames ``lo..hi`` for prompts on the frames ``prompted``.

    Forward from the first prompted frame in the range (else ``lo``) to ``hi``; backward from the last
    (else ``hi``) to ``lo``, for ``"both"`` only when there is anything before it. ``backward_first``
    (lineage): objects found while going forward must not be tracked backward.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    inside = sorted(t for t in prompted if lo <= t <= hi)
    first, last = (inside[0], inside[-1]) if inside else (lo, hi)
    passes = []
    if direction in ("forward", "both"):
        passes.append(Pass(first, hi - first, False))
    if direction == "backward" or (direction == "both" and last > lo):
        passes.append(Pass(last, last - lo, True))
    if backward_first:
        passes.sort(key=lambda p: not p.reverse)
    return passes


def needs_history(passes: Sequence[Pass], hi: int) -> bool:
    """Whether a pass re-reads frames another pass tracked (then tracked frames must be kept, on disk
    beyond the RAM window): a backward pass that starts inside the forward pass's span."""
    backward = [p for p in passes if p.reverse]
    return len(passes) == 2 and bool(backward) and backward[0].start < hi


def run_passes(predictor: VideoPredictorLike, state, passes: Sequence[Pass]) -> Iterator[tuple[int, list, object]]:
    """``(t, obj_ids, mask_logits)`` per tracked frame, pass after pass."""
    for p in passes:
        yield from predictor.propagate_in_video(state, start_frame_idx=p.start, max_frame_num_to_track=p.count,
                                                reverse=p.reverse)


@runtime_checkable
class VideoPredictorLike(Protocol):
    """What the notebook API, the batch runner and the lineage tracker need of a video predictor:
    the official video predictor's session methods (:class:`napari_sam2.VideoPredictor` has them; the
    test doubles implement them too). ``model`` is the network, for automatic seeding."""

    model: Any

    def init_state(self, video, **kwargs) -> Any: ...

    def add_new_points_or_box(self, inference_state, frame_idx: int, obj_id, points=None, labels=None,
                              clear_old_points: bool = True, normalize_coords: bool = True, box=None) -> Any: ...

    def add_new_mask(self, inference_state, frame_idx: int, obj_id, mask) -> Any: ...

    def propagate_in_video(self, inference_state, start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None,
                           reverse: bool = False) -> Iterator[tuple[int, list, Any]]: ...

    def close(self, state) -> None: ...
