"""Synthetic time-lapse: realistic enough, deterministic, ground truth consistent with itself."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_sam2.io import open_stack, read_ctc_tracks, tracks_from_labels
from napari_sam2.synthetic import (
    make_timelapse,
    write_ctc_ground_truth,
    write_ctc_images,
)


@pytest.fixture(scope="module")
def ts():
    return make_timelapse(n_frames=20, shape=(128, 128), n_cells=6, seed=1)


def test_shapes_and_dtypes(ts):
    assert ts.image.shape == ts.labels.shape == (20, 128, 128)
    assert ts.image.dtype == np.uint16 and ts.labels.dtype == np.uint16
    assert ts.n_frames == 20
    assert set(ts.positions.columns) == {"frame", "label", "y", "x"}
    small = make_timelapse(n_frames=3, shape=(64, 80), n_cells=2, dtype=np.float32, seed=5)
    assert small.image.shape == (3, 64, 80) and small.image.dtype == np.float32


def test_deterministic_for_a_seed():
    a = make_timelapse(n_frames=8, shape=(64, 64), n_cells=3, seed=7)
    b = make_timelapse(n_frames=8, shape=(64, 64), n_cells=3, seed=7)
    c = make_timelapse(n_frames=8, shape=(64, 64), n_cells=3, seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.lineage == b.lineage
    assert not np.array_equal(a.labels, c.labels)


def test_fluorescence_model(ts):
    background = ts.image[ts.labels == 0]
    cells = ts.image[ts.labels > 0]
    assert 90 <= np.median(background) <= 130  # camera offset
    assert 1000 <= np.median(cells) - np.median(background) <= 5000  # a few thousand counts
    # noise: background pixels vary, and the same pixel differs between frames
    assert background.std() > 3
    assert np.any(ts.image[0] != ts.image[1])
    # blur: intensity does not jump straight from background to cell at the mask edge
    edge = (ts.labels[0] > 0) & (np.roll(ts.labels[0], 1, axis=1) == 0)
    assert ts.image[0][edge].mean() < np.median(cells)


def test_lineage_matches_labels(ts):
    from_masks = tracks_from_labels(ts.labels)
    assert [t[:3] for t in from_masks] == [t[:3] for t in ts.lineage]
    for label, begin, end, _ in ts.lineage:
        present = [t for t in range(ts.n_frames) if np.any(ts.labels[t] == label)]
        assert present == list(range(begin, end + 1)), f"label {label} has gaps"


def test_divisions_are_consistent(ts):
    assert ts.divisions, "divide=True must produce at least one division"
    spans = {lab: (b, e) for lab, b, e, _ in ts.lineage}
    for parent, daughters, frame in ts.divisions:
        assert len(daughters) == 2
        parent_end = spans[parent][1]
        assert all(spans[d][0] == parent_end + 1 == frame for d in daughters)
        # daughters appear near the mother's last position, and are smaller
        mother = np.argwhere(ts.labels[parent_end] == parent)
        for d in daughters:
            child = np.argwhere(ts.labels[frame] == d)
            assert np.linalg.norm(child.mean(0) - mother.mean(0)) < 20
            assert len(child) < len(mother)
        assert not np.any(ts.labels[parent_end + 1:] == parent)


def test_no_divisions_or_entries_when_disabled():
    plain = make_timelapse(n_frames=10, shape=(96, 96), n_cells=4, divide=False, enter=False)
    assert plain.divisions == []
    assert [t[1:] for t in plain.lineage] == [(0, 9, 0)] * 4


def test_a_cell_enters_from_the_border(ts):
    newcomers = [(lab, b) for lab, b, _, parent in ts.lineage if parent == 0 and b > 0]
    assert len(newcomers) == 1
    label, begin = newcomers[0]
    assert begin == ts.n_frames // 2
    mask = ts.labels[begin] == label
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    assert np.any(mask & border)


def test_cells_move_smoothly_with_stable_ids(ts):
    pos = ts.positions.sort_values(["label", "frame"])
    steps = pos.groupby("label")[["y", "x"]].diff().dropna()
    assert np.hypot(steps.y, steps.x).max() < 10  # small steps: the same id follows one cell
    assert np.hypot(steps.y, steps.x).mean() > 0.1  # but they do move


def test_cells_do_not_overlap_much(ts):
    for t in range(ts.n_frames):
        drawn = ts.positions[ts.positions.frame == t]
        areas = [np.count_nonzero(ts.labels[t] == lab) for lab in drawn.label]
        assert min(areas) > 20  # no cell hidden by its neighbours


def test_write_ctc_ground_truth(ts, tmp_path):
    out = write_ctc_ground_truth(ts, tmp_path / "01_GT")
    tra, seg = out / "TRA", out / "SEG"
    assert (tra / "man_track000.tif").exists() and (tra / "man_track019.tif").exists()
    assert (seg / "man_seg000.tif").exists()
    assert read_ctc_tracks(tra / "man_track.txt") == [tuple(r) for r in ts.lineage]
    np.testing.assert_array_equal(tifffile.imread(tra / "man_track007.tif"), ts.labels[7])
    np.testing.assert_array_equal(open_stack(seg).data.compute(), ts.labels)
    images = write_ctc_images(ts, tmp_path / "01")
    np.testing.assert_array_equal(open_stack(images).data.compute(), ts.image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01", "01_GT"]


def test_impossible_packing_is_explained():
    with pytest.raises(ValueError, match="cannot fit 200 cells"):
        make_timelapse(n_frames=2, shape=(32, 32), n_cells=200)


def test_clicks_land_on_every_cell_near_its_centre(ts):
    for t in (0, ts.n_frames // 2, ts.n_frames - 1):
        clicks = ts.clicks(t)
        assert list(clicks.columns) == ["t", "y", "x", "obj_id"]
        assert all(dtype.kind == "i" for dtype in clicks.dtypes)
        present = np.unique(ts.labels[t])[1:].tolist()
        assert clicks.obj_id.tolist() == present and (clicks.t == t).all()
        for row in clicks.itertuples():
            assert ts.labels[t, row.y, row.x] == row.obj_id  # on the cell, whatever covers its true centre
            ys, xs = np.nonzero(ts.labels[t] == row.obj_id)
            assert np.hypot(row.y - ys.mean(), row.x - xs.mean()) <= np.hypot(ys - ys.mean(), xs - xs.mean()).min() + 1e-9
    some, every = ts.clicks(0, labels=[2, 1]), ts.clicks(0).set_index("obj_id")
    assert some.obj_id.tolist() == [2, 1]
    assert np.array_equal(some[["y", "x"]].to_numpy(), every.loc[[2, 1], ["y", "x"]].to_numpy())
    with pytest.raises(ValueError, match=r"label\(s\) \[999\] are not on frame 0"):
        ts.clicks(0, labels=[999])
    with pytest.raises(IndexError, match="frame 20 is out of range"):
        ts.clicks(ts.n_frames)
