"""Entering cells and divisions during propagation, lineage in tracks / CTC, and its TRA score.

Random weights cannot find cells, so the orchestration is tested with the test double of the video
predictor in ``tests/fakes.py``, driven by the synthetic ground truth and given its lineage: an
object follows the ground-truth cell under its prompt and, once that cell has divided, covers both
daughters (as SAM2's masklet of a dividing cell does: one object falling apart in two). New-object
masks come from the ground truth too (``NewObjectParams.mask_source``). One run with the real
network (random weights) checks that the options work together.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes import GroundTruthPredictor

import napari_sam2
from napari_sam2.api import segment_stack
from napari_sam2.evaluate import evaluate_ctc
from napari_sam2.io import read_ctc_tracks, write_ctc
from napari_sam2.lineage import (
    DivisionParams,
    NewObjectParams,
    division_params,
    new_object_params,
)
from napari_sam2.synthetic import make_timelapse, write_ctc_ground_truth
from napari_sam2.tracking import (
    TRACK_COLUMNS,
    add_parents,
    ctc_tracks,
    tracks_graph,
    tracks_table,
)


@pytest.fixture(scope="module")
def ts():
    # 8 frames, 4 cells; cell 3 divides into 5, 6 on frame 2; cell 7 enters on frame 4
    ts = make_timelapse(n_frames=8, shape=(64, 72), n_cells=4, seed=1)
    assert ts.divisions == [(3, (5, 6), 2)] and (7, 4, 7, 0) in ts.lineage
    return ts


def _gt_masks(gt):
    return lambda image, t: [gt[t] == lab for lab in np.unique(gt[t]) if lab]


def test_divisions_and_entering_cells_score_tra_1(ts, tmp_path):
    fake = GroundTruthPredictor(ts.labels, lineage=ts.lineage)
    new = NewObjectParams(every=1, min_area=1, mask_source=_gt_masks(ts.labels))
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False,
                           detect_new=new, detect_divisions=DivisionParams(min_area=3, persist=2))
    # the parent's masklet fell apart on frame 2: two daughters with new ids start there
    assert len(result.parents) == 2 and set(result.parents.values()) == {3}
    daughters = sorted(result.parents)
    starts = {obj: t for kind, t, obj, _ in (e for e in fake.log if e[0] in ("prompt", "mask")) if obj in daughters}
    assert set(starts.values()) == {2}
    # the entering cell was added on its first frame, as a new object
    entering = [e for e in fake.log if e[0] in ("prompt", "mask") and e[3] == 7]
    assert len(entering) == 1 and entering[0][1] == 4 and entering[0][2] not in (1, 2, 3, 4)
    # tracks carry the lineage; the parent ends on the frame before its daughters
    assert list(result.tracks.columns) == TRACK_COLUMNS + ["parent"]
    lineage = ctc_tracks(result.tracks)
    by_label = {r[0]: r for r in lineage}
    assert by_label[3][2] == 1 and all(by_label[d][1] == 2 and by_label[d][3] == 3 for d in daughters)
    assert tracks_graph(result.tracks) == {d: [3] for d in daughters}
    assert np.isnan(result.scores[3][2:]).all() and (result.scores[3][:2] == 8).all()
    # written as CTC and scored against the ground truth: perfect
    res = result.to_ctc(tmp_path / "01_RES")
    assert sorted(read_ctc_tracks(res / "res_track.txt")) == sorted(lineage)
    gt = write_ctc_ground_truth(ts, tmp_path / "01_GT")
    scores = evaluate_ctc(res, gt)
    assert scores["TRA"] == pytest.approx(1.0) and scores["DET"] == pytest.approx(1.0)
    assert scores["SEG"] == pytest.approx(1.0)


def test_without_detection_lineage_is_lost(ts, tmp_path):
    fake = GroundTruthPredictor(ts.labels, lineage=ts.lineage)
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False)
    assert list(result.tracks.columns) == TRACK_COLUMNS and result.parents == {}
    res = result.to_ctc(tmp_path / "res")
    scores = evaluate_ctc(res, write_ctc_ground_truth(ts, tmp_path / "gt"))
    assert scores["TRA"] < 1.0 and scores["DET"] < 1.0


def test_split_needs_to_persist_and_be_comparable():
    blip = np.zeros((4, 20, 20), np.uint16)
    blip[:, 2:8, 2:8] = 1
    blip[1, 12:18, 12:18] = 1  # the masklet falls apart on one frame only
    result = segment_stack(blip.astype(np.float32), points=[[0, 4, 4, 1]], predictor=GroundTruthPredictor(blip),
                           progress=False, detect_divisions=True)
    assert result.parents == {} and result.obj_ids == [1]

    gt = np.zeros((4, 20, 20), np.uint16)
    gt[0, 2:8, 2:14] = 1
    gt[1:, 2:8, 2:8] = 2
    gt[1:, 2:5, 11:14] = 3  # a daughter a quarter of its sister's size
    lineage = [(1, 0, 0, 0), (2, 1, 3, 1), (3, 1, 3, 1)]
    kwargs = dict(points=[[0, 4, 4, 1]], progress=False)
    result = segment_stack(gt.astype(np.float32), predictor=GroundTruthPredictor(gt, lineage=lineage),
                           detect_divisions={"size_ratio": 0.5}, **kwargs)
    assert result.parents == {}
    result = segment_stack(gt.astype(np.float32), predictor=GroundTruthPredictor(gt, lineage=lineage),
                           detect_divisions={"size_ratio": 0.2, "min_area": 5}, **kwargs)
    assert result.parents == {2: 1, 3: 1}
    assert sorted(ctc_tracks(result.tracks)) == lineage
    assert np.array_equal(result.labels, gt)


def test_parameters_parsing():
    assert new_object_params(False) is None and new_object_params(None) is None
    assert new_object_params(True) == NewObjectParams()
    assert new_object_params(3).every == 3
    assert division_params({"persist": 3}).persist == 3
    with pytest.raises(ValueError, match="unknown detect_divisions"):
        division_params({"persist": 3, "bogus": 1})
    with pytest.raises(ValueError, match="every"):
        new_object_params(0)
    with pytest.raises(TypeError):
        division_params("yes")
    gt = np.zeros((3, 16, 16), np.uint16)
    gt[:, 4:8, 4:8] = 1
    with pytest.raises(ValueError, match="forward"):
        segment_stack(gt, points=[[2, 5, 5, 1]], predictor=GroundTruthPredictor(gt), direction="backward",
                      detect_divisions=True, progress=False)


def test_tracks_graph_and_ctc_drop_impossible_parents(ts):
    df = add_parents(tracks_table(ts.labels), {lab: p for lab, _, _, p in ts.lineage})
    assert tracks_graph(df) == {5: [3], 6: [3]}
    assert sorted(ctc_tracks(df)) == sorted(ts.lineage)
    bad = add_parents(tracks_table(ts.labels), {2: 1, 5: 99})  # 1 does not end before 2; 99 is no track
    assert tracks_graph(bad) == {}


def test_real_network_with_both_options(ts, tmp_path, random_checkpoint):
    predictor = napari_sam2.build_video_predictor("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                                                  image_size=128)
    small = ts.image[:5]
    new = {"every": 2, "min_area": 1, "iou_threshold": 0.5, "max_covered": 1.0, "max_objects": 4,
           "generator": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}
    result = segment_stack(small, points=ts.clicks(1).head(2), predictor=predictor, progress=False,
                           detect_new=new, detect_divisions=DivisionParams(min_area=1, size_ratio=0.01))
    assert result.labels.shape == small.shape and "parent" in result.tracks.columns
    assert set(np.unique(result.labels).tolist()) <= {0, *result.obj_ids}
    assert len(result.obj_ids) <= 4 and set(result.parents) <= set(result.obj_ids)
    write_ctc(tmp_path / "res", result.labels, tracks=ctc_tracks(result.tracks))
