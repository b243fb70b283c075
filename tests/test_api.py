"""segment_stack: prompts in, labels / scores / tracks out, written frame by frame.

Random weights make SAM2's masks meaningless, so two kinds of tests:

- plumbing with the real network (random weights, image_size 256, tiny stacks): shapes, dtypes,
  OME-Zarr output, scores, automatic seeding;
- meaning with a test double of the video predictor (``tests/fakes.py``) that "tracks" by reading
  the synthetic ground truth (a click on a cell gives that cell's mask on every frame): labels,
  tracks, CTC files and the propagation plan are then checked against the ground truth exactly.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from fakes import GroundTruthPredictor

import napari_sam2
from napari_sam2.api import SegmentationResult, segment_stack
from napari_sam2.io import read_ctc_tracks, tracks_from_labels
from napari_sam2.labels import logits_to_labels
from napari_sam2.prompts import PromptError
from napari_sam2.synthetic import make_timelapse
from napari_sam2.tracking import TRACK_COLUMNS, ctc_tracks, tracks_table

IMAGE_SIZE = 256


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def predictor(random_checkpoint):
    return napari_sam2.build_video_predictor("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                                             image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def ts():
    # 8 frames, 4 cells, one divides (labels 5, 6 start mid-way), one enters from the border
    return make_timelapse(n_frames=8, shape=(64, 72), n_cells=4, seed=1)


def _only(gt: np.ndarray, labels) -> np.ndarray:
    return np.where(np.isin(gt, list(labels)), gt, 0).astype(np.uint32)


# ------------------------------------------------------------------------------------ meaning
def test_labels_and_tracks_equal_ground_truth(ts):
    fake = GroundTruthPredictor(ts.labels)
    clicks = ts.clicks(3)
    result = segment_stack(ts.image, points=clicks, predictor=fake, progress=False)
    ids = sorted(int(i) for i in clicks.obj_id)
    assert isinstance(result, SegmentationResult) and result.obj_ids == ids
    expected = _only(ts.labels, ids)
    assert result.labels.dtype == np.uint32 and np.array_equal(result.labels, expected)
    # the tracks table measures exactly the ground truth's cells
    truth = tracks_table(expected)
    pd.testing.assert_frame_equal(result.tracks.drop(columns="score"), truth.drop(columns="score"))
    assert list(result.tracks.columns) == TRACK_COLUMNS
    assert (result.tracks["score"] == 8.0).all()
    for obj in ids:
        present = (ts.labels == obj).any(axis=(1, 2))
        assert np.array_equal(result.scores[obj], np.where(present, 8.0, -8.0))
    assert result.scores_table().shape == (ts.n_frames, len(ids))


def test_writers_from_a_result_are_consistent(ts, tmp_path):
    fake = GroundTruthPredictor(ts.labels)
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False,
                           out=tmp_path / "labels.ome.zarr")
    ctc = result.to_ctc(tmp_path / "01_RES")
    masks = np.stack([tifffile.imread(ctc / f"mask{t:03d}.tif") for t in range(ts.n_frames)])
    assert np.array_equal(masks, result.labels[:])
    # res_track.txt: begin / end per label as in the masks, no parents (SAM2 objects do not divide)
    assert read_ctc_tracks(ctc / "res_track.txt") == tracks_from_labels(masks) == ctc_tracks(result.tracks)
    begins = {lab: (b, e) for lab, b, e, _ in read_ctc_tracks(ctc / "res_track.txt")}
    for lab, b, e, _ in ts.lineage:
        if lab in result.obj_ids:
            assert begins[lab] == (b, e)
    tif = result.to_tiff(tmp_path / "labels.tif")
    assert np.array_equal(tifffile.imread(tif), result.labels[:])
    csv = result.to_csv(tmp_path / "tracks.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), result.tracks, check_dtype=False)


def test_both_directions_from_earliest_and_latest_prompt(ts):
    fake = GroundTruthPredictor(ts.labels)
    points = pd.concat([ts.clicks(2, [1]), ts.clicks(5, [2])], ignore_index=True)
    result = segment_stack(ts.image, points=points, predictor=fake, progress=False)
    yields = [e[1:] for e in fake.log if e[0] == "yield"]
    n = ts.n_frames
    assert yields == [(t, False) for t in range(2, n)] + [(t, True) for t in range(5, -1, -1)]
    assert fake.log[0][3] == "disk"  # the backward pass reads frames the forward pass tracked
    assert np.array_equal(result.labels, _only(ts.labels, [1, 2]))


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_one_direction(ts, direction):
    fake = GroundTruthPredictor(ts.labels)
    points = pd.concat([ts.clicks(2, [1]), ts.clicks(5, [2])], ignore_index=True)
    result = segment_stack(ts.image, points=points, predictor=fake, progress=False, direction=direction)
    expected = _only(ts.labels, [1, 2])
    yields = [e[1:] for e in fake.log if e[0] == "yield"]
    if direction == "forward":
        assert yields == [(t, False) for t in range(2, ts.n_frames)]
        assert not result.labels[:2].any() and np.array_equal(result.labels[2:], expected[2:])
    else:
        assert yields == [(t, True) for t in range(5, -1, -1)]
        assert not result.labels[6:].any() and np.array_equal(result.labels[:6], expected[:6])
    assert fake.log[0][3] == "ram"  # one pass: nothing is re-read, nothing spilled to disk


def test_prompts_on_first_frame_run_one_pass(ts):
    fake = GroundTruthPredictor(ts.labels)
    segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False, direction="both")
    assert [e[2] for e in fake.log if e[0] == "yield"] == [False] * ts.n_frames
    assert fake.history == "disk"  # the caller's predictor is left as it was


def test_boxes_and_mask_prompts(ts):
    fake = GroundTruthPredictor(ts.labels)
    gt0 = ts.labels[0]
    ys, xs = np.nonzero(gt0 == 2)
    boxes = pd.DataFrame({"t": [0], "y0": [ys.min()], "x0": [xs.min()], "y1": [ys.max()], "x1": [xs.max()], "obj_id": [2]})
    seed = np.where(gt0 == 3, 3, 0)
    result = segment_stack(ts.image, boxes=boxes, masks=seed, predictor=fake, progress=False)
    assert result.obj_ids == [2, 3]
    assert [e[0] for e in fake.log[:3]] == ["init", "prompt", "mask"]
    assert np.array_equal(result.labels, _only(ts.labels, [2, 3]))


def test_streaming_writes_each_frame_as_it_comes(ts, tmp_path):
    fake = GroundTruthPredictor(ts.labels)
    out = tmp_path / "stream.ome.zarr"

    def callback(t, frame):
        assert not out.exists(), "the final store appears only when complete"
        assert fake.log[-1] == ("yield", t, False)  # written before the next frame is made
        fake.log.append(("written", t))

    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False, out=out,
                           callback=callback)
    events = [e for e in fake.log if e[0] in ("yield", "written")]
    assert events == [e for t in range(ts.n_frames) for e in (("yield", t, False), ("written", t))]
    assert result.path == out and out.exists()
    assert isinstance(result.labels, zarr.Array) and result.labels.chunks == (1, 64, 72)
    assert np.array_equal(result.labels[:], _only(ts.labels, result.obj_ids))
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert attrs["multiscales"][0]["axes"][0]["name"] == "t"
    assert sorted(os.listdir(tmp_path)) == ["stream.ome.zarr"]  # no temporary left behind
    with pytest.raises(FileExistsError):
        segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False, out=out)


def test_crash_leaves_no_complete_looking_output(ts, tmp_path):
    fake = GroundTruthPredictor(ts.labels, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated crash on frame 3"):
        segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False,
                      out=tmp_path / "crash.ome.zarr")
    assert os.listdir(tmp_path) == []
    assert fake.log[-1] == ("close",)  # the session is closed (temporary files freed)


def test_array_sink(ts):
    fake = GroundTruthPredictor(ts.labels)
    sink = np.zeros(ts.labels.shape, np.uint16)
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False, out=sink)
    assert result.labels is sink and np.array_equal(sink, _only(ts.labels, result.obj_ids))
    with pytest.raises(ValueError, match=r"out has shape \(2, 2, 2\)"):
        segment_stack(ts.image, points=ts.clicks(0), predictor=fake, out=np.zeros((2, 2, 2)))


def test_masks_to_labels_highest_positive_logit():
    logits = torch.tensor([[[[-1.0, 2.0, 5.0, -3.0]]], [[[0.5, 3.0, 1.0, -0.1]]]])  # 2 x 1 x 1 x 4
    assert logits_to_labels(logits, [7, 9]).tolist() == [[9, 9, 7, 0]]
    assert logits_to_labels(torch.zeros(0, 1, 2, 3), []).shape == (2, 3)
    with pytest.raises(ValueError, match="got 2 masks but 1 object ids"):
        logits_to_labels(logits, [7])
    # ids beyond what the winners' slots hold, and more objects than a 16-bit slot counts
    many = torch.randn(40000, 1, 1, 3)
    ids = np.arange(10**6, 10**6 + 40000)
    best, index = many[:, 0].max(dim=0)
    assert logits_to_labels(many, ids).tolist() == np.where(best > 0, ids[index], 0).tolist()


# ------------------------------------------------------------------------------------ errors
def test_bad_prompts_fail_before_any_work(ts):
    fake = GroundTruthPredictor(ts.labels)
    with pytest.raises(PromptError, match=r"points row 1: frame t=8 is outside the stack: the stack is 8 frames"):
        segment_stack(ts.image, points=[[0, 10, 10], [8, 10, 10]], predictor=fake)
    with pytest.raises(PromptError, match=r"points row 0: point \(y=64, x=10\) on frame 0 lies outside the frame"):
        segment_stack(ts.image, points=[[0, 64, 10]], predictor=fake)
    with pytest.raises(PromptError, match=r"boxes row 0: box .* reaches outside"):
        segment_stack(ts.image, boxes=[[0, 1, 1, 10, 90]], predictor=fake)
    assert fake.log == []


def test_axes_and_channel(ts):
    two_channels = np.stack([np.zeros_like(ts.image), ts.image], axis=1)  # (T, C, Y, X)
    fake = GroundTruthPredictor(ts.labels)
    result = segment_stack(two_channels, points=ts.clicks(0), axes="TCYX", channel=1, predictor=fake,
                           progress=False)
    assert fake.log[0][:3] == ("init", "TYX", (8, 64, 72))
    assert result.labels.shape == (8, 64, 72)
    with pytest.raises(ValueError, match=r"channel=2 is out of range: the stack has 2 channels"):
        segment_stack(two_channels, points=ts.clicks(0), axes="TCYX", channel=2, predictor=fake)
    with pytest.raises(ValueError, match=r"has shape \(8, 2, 64, 72\) .* axes='TYX' was given"):
        segment_stack(two_channels, points=ts.clicks(0), axes="TYX", predictor=fake)
    with pytest.raises(ValueError, match="direction must be one of"):
        segment_stack(ts.image, points=ts.clicks(0), predictor=fake, direction="sideways")


def test_bad_auto_parameters_fail_before_building_a_model(ts):
    with pytest.raises(ValueError, match=r"unknown automatic mask generator parameter\(s\) points_per_sid"):
        segment_stack(ts.image, auto={"points_per_sid": 8}, checkpoint="/does/not/exist.pt")
    with pytest.raises(ValueError, match="prompts were given too"):
        segment_stack(ts.image, points=[[0, 1, 1]], auto={"points_per_side": 8}, checkpoint="/does/not/exist.pt")


# ------------------------------------------------------------------------------------ automatic seeding
def test_auto_seeding_tracks_every_seeded_object(ts, predictor, monkeypatch):
    from napari_sam2.predictor import amg

    seen = {}

    def generate(self, image):
        seen["image"] = image
        seen["params"] = (self.pred_iou_thresh, self.min_area)
        gt0 = ts.labels[0]
        return [{"segmentation": gt0 == lab, "area": int((gt0 == lab).sum()), "predicted_iou": 1.0 - 0.1 * lab}
                for lab in np.unique(gt0)[1:]]

    monkeypatch.setattr(amg.AutomaticMaskGenerator, "generate", generate)
    fake = GroundTruthPredictor(ts.labels, model=predictor.model)
    result = segment_stack(ts.image, predictor=fake, progress=False, auto={"min_area": 5, "pred_iou_thresh": 0.5})
    first = np.unique(ts.labels[0])[1:].tolist()
    assert result.obj_ids == first  # ranked by predicted IoU: ids follow the ground truth's here
    assert np.array_equal(seen["image"], ts.image[0]) and seen["params"] == (0.5, 5)
    assert [e[0] for e in fake.log[1:1 + len(first)]] == ["mask"] * len(first)
    assert np.array_equal(result.labels, _only(ts.labels, first))

    fake = GroundTruthPredictor(ts.labels, model=predictor.model)
    result = segment_stack(ts.image, predictor=fake, progress=False, auto={"max_objects": 2})
    assert result.obj_ids == first[:2]


def test_auto_seeding_finding_nothing_gives_empty_labels(ts, predictor, monkeypatch, tmp_path):
    from napari_sam2.predictor import amg

    monkeypatch.setattr(amg.AutomaticMaskGenerator, "generate", lambda self, image: [])
    fake = GroundTruthPredictor(ts.labels, model=predictor.model)
    with pytest.warns(RuntimeWarning, match="found no object on frame 0"):
        result = segment_stack(ts.image, predictor=fake, progress=False, out=tmp_path / "empty.ome.zarr")
    assert result.obj_ids == [] and not result.labels[:].any() and len(result.tracks) == 0


# ------------------------------------------------------------------------------------ the real network
def test_real_network_plumbing(ts, random_checkpoint, tmp_path):
    small = ts.image[:5, :48, :48]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. no "frames never written" warning
        result = napari_sam2.segment_stack(
            small, points=pd.DataFrame({"t": [1, 1], "y": [10.0, 12.0], "x": [10.0, 30.0], "obj_id": [1, 1], "positive": [1, 0]}),
            boxes=[[3, 20, 20, 40, 40, 4]], checkpoint=random_checkpoint, image_size=IMAGE_SIZE, device="cpu",
            out=tmp_path / "real.ome.zarr", progress=False,
        )
    assert result.labels.shape == (5, 48, 48) and result.labels.dtype == np.uint32
    assert result.obj_ids == [1, 4]
    assert set(np.unique(result.labels[:]).tolist()) <= {0, 1, 4}
    assert set(result.scores) == {1, 4}
    for s in result.scores.values():
        assert s.shape == (5,) and s.dtype == np.float32 and np.isfinite(s).all()  # both passes cover every frame
    assert list(result.tracks.columns) == TRACK_COLUMNS
    assert np.array_equal(result.tracks.drop(columns="score"), tracks_table(result.labels).drop(columns="score"))


def test_real_network_reused_predictor_and_auto_seeding(ts, predictor):
    small = ts.image[:3, :48, :48]
    first = segment_stack(small, points=[[0, 20, 20]], predictor=predictor, progress=False)
    assert isinstance(first.labels, np.ndarray) and first.labels.shape == (3, 48, 48)
    auto = segment_stack(small, predictor=predictor, progress=False,
                         auto={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                               "max_objects": 2})
    assert 1 <= auto.n_objects <= 2 and auto.obj_ids == list(range(1, auto.n_objects + 1))
    assert set(np.unique(auto.labels).tolist()) <= {0, *auto.obj_ids}
    assert predictor.history == "disk"
