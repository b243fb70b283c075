"""A real video predictor steered by a synthetic ground truth: the network's cost, the truth's masks.

Untrained weights cannot find cells, so the lineage engine's cost on a real network (objects tracked
per frame, seconds per frame, memory) cannot be measured from what they segment. `GroundTruthSteering`
wraps a :class:`napari_sam2.VideoPredictor`: every call runs on the real predictor (prompts, memory,
tracking steps, ended tracks), but each frame it yields the ground-truth masks of its objects instead
of the network's: an object follows the cell under its prompt and, once that cell has divided,
covers the cell's live descendants (as SAM2's masklet of a dividing cell does). Used by
``benchmarks/bench_lineage.py`` and the tests.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["GroundTruthSteering", "cells_covered", "children_of", "prompted_cell"]


def prompted_cell(frame: np.ndarray, points=None, labels=None, box=None, mask=None) -> int:
    """The ground-truth label a prompt picks on one frame (0: none): the cell under the first positive
    click (x, y), under a box's centre, or the most frequent label under a mask."""
    if mask is not None:
        values = frame[np.asarray(mask, bool)]
        return int(np.bincount(values).argmax()) if values.size else 0
    if points is not None:
        x, y = np.asarray(points)[np.asarray(labels) == 1][0]
    else:
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return int(frame[int(round(y)), int(round(x))])


def cells_covered(frame: np.ndarray, label: int, children: dict[int, list[int]]) -> list[int]:
    """Ground-truth labels an object that follows cell ``label`` covers on one frame: the cell itself,
    or once it is gone after dividing, its live descendants."""
    if (frame == label).any() or label not in children:
        return [label]
    return [c for d in children[label] for c in cells_covered(frame, d, children)]


def children_of(lineage) -> dict[int, list[int]]:
    """``{mother: [daughters]}`` of a CTC lineage ``(label, begin, end, parent)``."""
    out: dict[int, list[int]] = {}
    for lab, _, _, parent in lineage or ():
        if parent:
            out.setdefault(parent, []).append(lab)
    return out


class GroundTruthSteering:
    """``predictor``'s sessions, with the masks of ``gt`` ((T, Y, X) labels, CTC ``lineage``).

    ``steps``: ``(t, objects tracked)`` for every frame the real predictor tracked, in order.
    """

    def __init__(self, predictor, gt: np.ndarray, lineage=None):
        self.predictor = predictor
        self.model = predictor.model
        self.gt = np.asarray(gt)
        self.children = children_of(lineage)
        self.follows: dict[int, int] = {}  # object -> ground-truth label
        self.steps: list[tuple[int, int]] = []

    def init_state(self, video, **kwargs):
        return self.predictor.init_state(video, **kwargs)

    def _follow(self, obj_id, label: int) -> None:
        if label <= 0:
            raise ValueError(f"the prompt of object {obj_id} touches no ground-truth cell")
        self.follows[obj_id] = int(label)

    def add_new_points_or_box(self, state, frame_idx, obj_id, points=None, labels=None, box=None, **kwargs):
        self._follow(obj_id, prompted_cell(self.gt[frame_idx], points, labels, box))
        return self.predictor.add_new_points_or_box(state, frame_idx, obj_id, points=points, labels=labels, box=box,
                                                    **kwargs)

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self._follow(obj_id, prompted_cell(self.gt[frame_idx], mask=mask))
        return self.predictor.add_new_mask(state, frame_idx, obj_id, mask)

    def end_object(self, state, obj_id, frame_idx):
        return self.predictor.end_object(state, obj_id, frame_idx)

    def propagate_in_video(self, state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        frames = self.predictor.propagate_in_video(state, start_frame_idx=start_frame_idx,
                                                   max_frame_num_to_track=max_frame_num_to_track, reverse=reverse)
        try:
            for t, ids, logits in frames:
                self.steps.append((t, len(ids)))
                inside = [np.isin(self.gt[t], cells_covered(self.gt[t], self.follows[o], self.children)) for o in ids]
                truth = np.where(np.stack(inside)[:, None], 8.0, -8.0) if ids else np.zeros((0, 1, *self.gt.shape[1:]))
                yield t, ids, torch.as_tensor(truth, dtype=logits.dtype)
        finally:
            frames.close()

    def close(self, state):
        self.predictor.close(state)
