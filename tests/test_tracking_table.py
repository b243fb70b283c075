"""Tracks tables from label videos: measurements equal the ground truth's, CTC lineage consistent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_sam2.io import read_ctc_tracks, tracks_from_labels, write_ctc
from napari_sam2.synthetic import make_timelapse
from napari_sam2.tracking import TRACK_COLUMNS, TrackTable, ctc_tracks, frame_regions, napari_tracks, tracks_table


@pytest.fixture(scope="module")
def timelapse():
    return make_timelapse(n_frames=12, shape=(64, 80), n_cells=4, seed=3)


def _truth(labels: np.ndarray) -> pd.DataFrame:
    """The same measurements, the slow obvious way."""
    rows = []
    for t, frame in enumerate(labels):
        for label in np.unique(frame):
            if label == 0:
                continue
            ys, xs = np.nonzero(frame == label)
            rows.append((t, int(label), ys.mean(), xs.mean(), ys.size, ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    df = pd.DataFrame(rows, columns=TRACK_COLUMNS[:-1])
    return df.sort_values(["label", "t"]).reset_index(drop=True)


def test_frame_regions_small_example():
    frame = np.zeros((5, 6), np.uint32)
    frame[1:3, 2:5] = 7
    frame[4, 0] = 70000
    assert frame_regions(frame) == [(7, 1.5, 3.0, 6, 1, 2, 3, 5), (70000, 4.0, 0.0, 1, 4, 0, 5, 1)]
    assert frame_regions(np.zeros((3, 3), np.uint16)) == []
    full = np.full((2, 2), 3, np.uint8)  # no background at all
    assert frame_regions(full) == [(3, 0.5, 0.5, 4, 0, 0, 2, 2)]


def test_tracks_equal_ground_truth(timelapse):
    df = tracks_table(timelapse.labels)
    assert list(df.columns) == TRACK_COLUMNS
    truth = _truth(timelapse.labels)
    pd.testing.assert_frame_equal(df.drop(columns="score"), truth, check_dtype=False)
    assert df["score"].isna().all()
    # every ground-truth label has one row per frame where it is drawn, from its begin to its end
    for label, begin, end, _ in timelapse.lineage:
        frames = df.loc[df["label"] == label, "t"]
        assert frames.min() == begin and frames.max() == end


def test_centroids_follow_the_true_centres(timelapse):
    df = tracks_table(timelapse.labels)
    pos = timelapse.positions.rename(columns={"frame": "t"})
    merged = df.merge(pos, on=["t", "label"], suffixes=("", "_true"))
    inside = merged[(merged["bbox_y0"] > 0) & (merged["bbox_x0"] > 0)
                    & (merged["bbox_y1"] < 64) & (merged["bbox_x1"] < 80)]
    # cells cut by a neighbour drawn on top or by the border move their centroid; most do not
    close = (np.hypot(inside["y"] - inside["y_true"], inside["x"] - inside["x_true"]) < 1.0).mean()
    assert close > 0.9


def test_rewritten_frame_replaces_its_rows():
    table = TrackTable()
    a = np.zeros((4, 4), np.uint32)
    a[0, 0] = 1
    b = np.zeros((4, 4), np.uint32)
    b[1:3, 1:3] = 2
    table.update(0, a)
    table.update(1, a)
    table.update(0, b)  # e.g. the backward pass after the forward pass
    df = table.to_dataframe({1: np.array([0.5, -1.0], np.float32), 2: np.array([3.0, np.nan], np.float32)})
    assert df[["t", "label", "area"]].values.tolist() == [[1, 1, 1], [0, 2, 4]]
    assert df["score"].tolist() == [-1.0, 3.0]
    assert len(table) == 2


def test_ctc_tracks_consistent_with_masks(timelapse, tmp_path):
    df = tracks_table(timelapse.labels)
    lineage = ctc_tracks(df)
    # SAM2 objects do not divide: the ground truth's spans with no parents
    assert lineage == [(lab, b, e, 0) for lab, b, e, _ in timelapse.lineage]
    assert lineage == tracks_from_labels(timelapse.labels)
    out = write_ctc(tmp_path / "01_RES", timelapse.labels, tracks=lineage)  # checked against the masks
    assert read_ctc_tracks(out / "res_track.txt") == lineage
    assert ctc_tracks(df.iloc[0:0]) == []


def test_napari_tracks(timelapse):
    df = tracks_table(timelapse.labels)
    data = napari_tracks(df)
    assert data.shape == (len(df), 4)
    assert np.array_equal(data[:, 0], df["label"]) and np.array_equal(data[:, 1], df["t"])


def test_tracks_table_rejects_non_videos():
    with pytest.raises(ValueError, match=r"\(T, Y, X\) video"):
        tracks_table(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="must be 2D"):
        frame_regions(np.zeros((2, 4, 4)))
