"""Test doubles shared by the test files (no network, no reference needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from napari_sam2.io import percentile_range
from napari_sam2.synthetic_steering import cells_covered, children_of, prompted_cell


class GroundTruthPredictor:
    """Test double of VideoPredictor: objects follow the ground-truth cell under their prompt.

    A click (the first positive point (x, y)), a box's centre or a mask (its most frequent label)
    picks the ground-truth label there; propagation yields that label's mask as logits (+8 inside,
    -8 outside) on every frame, and object scores of +8 where the object has pixels and -8 where it
    has none.

    Options
    -------
    lineage : list of (label, begin, end, parent), optional
        CTC lineage of `gt`. When given, an object whose cell has divided covers the union of that
        cell's descendants alive on the frame (as SAM2's masklet of a dividing cell does: one object
        falling apart in two); without it the object is empty after its cell has gone.
    fail_at : int, optional
        Propagation raises ``RuntimeError`` on reaching this frame.
    model : optional
        What ``.model`` returns (the network the automatic mask generator would use).

    ``end_object(state, obj_id, t)`` ends an object's track as the real predictor does: it is not
    tracked (nor yielded) from frame t on.

    Every call is logged in order in ``log``: ``("init", axes, shape, history)``,
    ``("prompt", t, obj_id, label)``, ``("mask", t, obj_id, label)``, ``("end", t, obj_id)``,
    ``("yield", t, reverse)``, ``("close",)``; ``steps`` holds ``(t, objects tracked)`` per frame yielded.
    """

    history = "disk"

    def __init__(self, gt: np.ndarray, lineage=None, fail_at: int | None = None, model=None):
        self.gt = gt
        self.fail_at = fail_at
        self.model = model
        self.children = children_of(lineage)
        self.log: list[tuple] = []
        self.steps: list[tuple[int, int]] = []

    def init_state(self, video, history=None, **kwargs):
        self.log.append(("init", video.axes, tuple(video.shape), history or self.history))
        state = SimpleNamespace(objs={}, scores={}, ends={}, prompted={},
                                intensity_range=percentile_range(video.data))
        state.object_score_logits = lambda obj: state.scores[obj]
        return state

    def _cells(self, label: int, t: int) -> list[int]:
        """The ground-truth labels object `label` covers on frame t: itself, or its live descendants."""
        return cells_covered(self.gt[t], label, self.children)

    def _attach(self, state, kind, t, obj_id, label):
        self.log.append((kind, t, obj_id, int(label)))
        assert label > 0, "the prompt does not touch a cell"
        state.objs[obj_id] = int(label)
        state.prompted.setdefault(obj_id, set()).add(t)
        state.ends.pop(obj_id, None)
        state.scores.setdefault(obj_id, np.full(len(self.gt), np.nan, np.float32))

    def end_object(self, state, obj_id, frame_idx):
        later = [f for f in state.prompted[obj_id] if f >= frame_idx]
        if later:
            raise ValueError(f"object {obj_id} has prompts on frame(s) {later}")
        self.log.append(("end", frame_idx, obj_id))
        state.ends[obj_id] = min(frame_idx, state.ends.get(obj_id, frame_idx))
        state.scores[obj_id][frame_idx:] = np.nan

    def add_new_points_or_box(self, state, frame_idx, obj_id, points=None, labels=None, box=None):
        self._attach(state, "prompt", frame_idx, obj_id, prompted_cell(self.gt[frame_idx], points, labels, box))

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self._attach(state, "mask", frame_idx, obj_id, prompted_cell(self.gt[frame_idx], mask=mask))

    def propagate_in_video(self, state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        n = len(self.gt) if max_frame_num_to_track is None else max_frame_num_to_track
        order = (range(start_frame_idx, max(start_frame_idx - n, 0) - 1, -1) if reverse
                 else range(start_frame_idx, min(start_frame_idx + n, len(self.gt) - 1) + 1))
        for t in order:
            if t == self.fail_at:
                raise RuntimeError(f"simulated crash on frame {t}")
            ids = [o for o in state.objs if t < state.ends.get(o, len(self.gt))]
            inside = np.stack([np.isin(self.gt[t], self._cells(state.objs[o], t)) for o in ids]) if ids else \
                np.zeros((0, *self.gt.shape[1:]), bool)
            for o, m in zip(ids, inside):
                state.scores[o][t] = 8.0 if m.any() else -8.0
            self.log.append(("yield", t, reverse))
            self.steps.append((t, len(ids)))
            yield t, ids, torch.from_numpy(np.where(inside[:, None], 8.0, -8.0).astype(np.float32))

    def close(self, state):
        self.log.append(("close",))
