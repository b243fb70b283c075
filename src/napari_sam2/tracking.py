"""Masklets -> tracks: one row per object and frame, built frame by frame as labels stream in.

A SAM2 object keeps its id through the video, so a label id *is* a track: no linking is needed.
:class:`TrackTable` measures every label of a frame when the frame is made (area, centroid,
bounding box) and keeps only those numbers, never the frames. The results convert to the Cell
Tracking Challenge lineage (:func:`ctc_tracks`) and to a napari Tracks layer (:func:`napari_tracks`).

Columns of a tracks table
-------------------------
``t``            frame index
``label``        object id (the label value in the masks; the track id)
``y, x``         centroid, pixels (napari order)
``area``         pixels
``bbox_y0, bbox_x0, bbox_y1, bbox_x1``  bounding box, ``y1``/``x1`` exclusive (as ``regionprops``)
``score``        SAM2's object-present logit for the object on the frame (> 0: present;
                 NaN where it was not computed, e.g. tables made from masks alone)
``parent``       (lineage tables only: ``segment_stack(detect_new=..., detect_divisions=...)``) the
                 label of the mother cell, 0 for none. Tables without the column have no divisions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["TRACK_COLUMNS", "PARENT_COLUMN", "frame_regions", "TrackTable", "tracks_table", "ctc_tracks",
           "napari_tracks", "tracks_graph", "add_parents"]

TRACK_COLUMNS = ["t", "label", "y", "x", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "score"]
PARENT_COLUMN = "parent"


def frame_regions(frame: np.ndarray) -> list[tuple]:
    """Measure every label of one ``(Y, X)`` label frame.

    Returns
    -------
    list of tuple
        ``(label, y, x, area, bbox_y0, bbox_x0, bbox_y1, bbox_x1)`` per label > 0, by label.
    """
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"a label frame must be 2D (Y, X), got shape {frame.shape}")
    ids, inverse = np.unique(frame, return_inverse=True)
    inverse = inverse.reshape(frame.shape)
    if ids.size == 0 or (ids.size == 1 and ids[0] == 0):
        return []
    n = ids.size
    flat = inverse.ravel()
    area = np.bincount(flat, minlength=n)
    yy, xx = np.indices(frame.shape, dtype=np.float64)
    sy = np.bincount(flat, weights=yy.ravel(), minlength=n)
    sx = np.bincount(flat, weights=xx.ravel(), minlength=n)
    boxes = ndimage.find_objects(inverse + 1)  # compact ids 1..n (index 0 = first id, maybe background)
    rows = []
    for k, label in enumerate(ids.tolist()):
        if label == 0 or area[k] == 0:
            continue
        sl = boxes[k]
        rows.append((int(label), sy[k] / area[k], sx[k] / area[k], int(area[k]),
                     sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    return rows


class TrackTable:
    """Tracks measured frame by frame; a frame written again (e.g. by a second propagation pass)
    replaces its earlier rows.

    Examples
    --------
    >>> table = TrackTable()
    >>> for t, frame in enumerate(label_frames):   # doctest: +SKIP
    ...     table.update(t, frame)
    >>> df = table.to_dataframe(scores)            # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._rows: dict[int, list[tuple]] = {}

    def update(self, t: int, frame: np.ndarray) -> None:
        """Measure label frame ``t`` (Y, X)."""
        self._rows[int(t)] = frame_regions(frame)

    def __len__(self) -> int:
        return sum(len(r) for r in self._rows.values())

    def to_dataframe(self, scores: Mapping[int, np.ndarray] | None = None) -> pd.DataFrame:
        """The table (columns :data:`TRACK_COLUMNS`), sorted by ``label, t``.

        ``scores``: object id -> per-frame object-present logits, shape (T,).
        """
        records = [(t, *row) for t in sorted(self._rows) for row in self._rows[t]]
        df = pd.DataFrame(records, columns=TRACK_COLUMNS[:-1])
        df = df.astype({"t": np.int64, "label": np.int64, "y": np.float64, "x": np.float64, "area": np.int64,
                        "bbox_y0": np.int64, "bbox_x0": np.int64, "bbox_y1": np.int64, "bbox_x1": np.int64})
        score = np.full(len(df), np.nan, dtype=np.float64)
        if scores:
            for i, (t, label) in enumerate(zip(df["t"].to_numpy(), df["label"].to_numpy())):
                s = scores.get(int(label))
                if s is not None and 0 <= t < len(s):
                    score[i] = float(s[t])
        df["score"] = score
        return df.sort_values(["label", "t"], kind="stable").reset_index(drop=True)


def tracks_table(labels, scores: Mapping[int, np.ndarray] | None = None) -> pd.DataFrame:
    """Tracks table of a ``(T, Y, X)`` label video (numpy, dask, zarr; read one frame at a time)."""
    table = TrackTable()
    if getattr(labels, "ndim", None) != 3:
        raise ValueError(f"labels must be a (T, Y, X) video, got shape {getattr(labels, 'shape', None)}")
    for t in range(int(labels.shape[0])):
        frame = labels[t]
        table.update(t, np.asarray(frame.compute() if hasattr(frame, "compute") else frame))
    return table.to_dataframe(scores)


def add_parents(tracks: pd.DataFrame, parents: Mapping[int, int]) -> pd.DataFrame:
    """The tracks table with a ``parent`` column (label -> mother label; 0 for labels not in ``parents``)."""
    out = tracks.copy()
    out[PARENT_COLUMN] = np.array([int(parents.get(int(lab), 0)) for lab in out["label"].to_numpy()], dtype=np.int64)
    return out


def _parents(tracks: pd.DataFrame) -> dict[int, int]:
    if PARENT_COLUMN not in tracks.columns or len(tracks) == 0:
        return {}
    first = tracks.groupby("label")[PARENT_COLUMN].first()
    return {int(lab): int(p) for lab, p in first.items() if int(p) != 0}


def ctc_tracks(tracks: pd.DataFrame) -> list[tuple[int, int, int, int]]:
    """Cell Tracking Challenge lineage ``(label, begin, end, parent)`` from a tracks table.

    ``begin``/``end`` are the first/last frame where the label has pixels, which is exactly what the
    CTC requires of ``res_track.txt``. ``parent`` comes from the table's ``parent`` column (0 without
    it); a parent that has no pixels, or does not end before its daughter begins, is dropped (0), so
    the lineage always satisfies the CTC rules.
    """
    if len(tracks) == 0:
        return []
    spans = tracks.groupby("label")["t"].agg(["min", "max"]).sort_index()
    parents = _parents(tracks)
    ends = {int(label): int(row["max"]) for label, row in spans.iterrows()}
    rows = []
    for label, row in spans.iterrows():
        parent = parents.get(int(label), 0)
        if parent not in ends or ends[parent] >= int(row["min"]):
            parent = 0
        rows.append((int(label), int(row["min"]), int(row["max"]), parent))
    return rows


def tracks_graph(tracks: pd.DataFrame) -> dict[int, list[int]]:
    """The lineage as napari's Tracks ``graph``: ``{child_id: [parent_id]}`` for every divided-from label.

    Only parents that are tracks of the table (and end before the child begins) are listed, as in
    :func:`ctc_tracks`: ``viewer.add_tracks(napari_tracks(df), graph=tracks_graph(df))``.
    """
    return {label: [parent] for label, _, _, parent in ctc_tracks(tracks) if parent}
def napari_tracks(tracks: pd.DataFrame) -> np.ndarray:
    """``(N, 4)`` array ``track_id, t, y, x`` for ``viewer.add_tracks``."""
    return tracks[["label", "t", "y", "x"]].to_numpy(dtype=np.float64)
