"""Lineage over many generations: ended tracks, daughters that divide again, cells that leave and come back.

The orchestration is driven by the ground truth through the test double of ``tests/fakes.py`` (an
object follows its cell and, once the cell has divided, covers the cell's live descendants, as SAM2's
masklet of a dividing cell does). The real predictor's side (``end_object``) is tested on the network
with random weights, and one end-to-end run on the network checks the pieces work together.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from fakes import GroundTruthPredictor
from models import random_model

from napari_sam2.api import segment_stack
from napari_sam2.cli import main
from napari_sam2.evaluate import evaluate_ctc
from napari_sam2.io import read_ctc_tracks, write_ctc
from napari_sam2.lineage import DivisionParams, NewObjectParams, _split
from napari_sam2.predictor import VideoPredictor
from napari_sam2.synthetic import SyntheticTimelapse, write_ctc_ground_truth
from napari_sam2.synthetic_colony import make_colony
from napari_sam2.synthetic_steering import GroundTruthSteering
from napari_sam2.tracking import ctc_tracks

LOST = 3


@pytest.fixture(scope="module")
def colony():
    # one cell -> 8 in 3 generations, daughters born touching, one cell of the last generation leaves
    ts = make_colony(n_frames=40, shape=(128, 128), n_cells=1, generations=3, cycle=10, jitter=2, leave=1, seed=0)
    assert len(ts.divisions) == 7 and max(len(np.unique(f)) - 1 for f in ts.labels) == 8
    return ts


def _gt_of(result_labels: np.ndarray, gt: np.ndarray) -> dict[int, int]:
    """Result label -> the ground-truth label it covers most."""
    out = {}
    for lab in np.unique(result_labels):
        if lab:
            values = gt[result_labels == lab]
            out[int(lab)] = int(np.bincount(values[values > 0]).argmax())
    return out


def _live(ts: SyntheticTimelapse, t: int) -> int:
    return sum(1 for _, b, e, _ in ts.lineage if b <= t <= e)


def _last_steps(steps) -> dict[int, int]:
    """Objects tracked per frame in the last pass over each frame (restarts track frames again)."""
    out = {}
    for t, n in steps:
        out[t] = n
    return out


def test_three_generations_every_division_found_lineage_equal_tra_1(colony, tmp_path):
    ts = colony
    fake = GroundTruthPredictor(ts.labels, lineage=ts.lineage)
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False,
                           detect_divisions=DivisionParams(), lost_after=LOST)
    # every division of the three generations, daughters of daughters included
    assert len(result.parents) == 14 and len(set(result.parents.values())) == 7
    labels = np.asarray(result.labels)
    to_gt = _gt_of(labels, ts.labels)
    assert len(set(to_gt.values())) == len(to_gt) == len(ts.lineage)  # one result track per true track
    found = {(to_gt[lab], b, e, to_gt.get(p, 0)) for lab, b, e, p in ctc_tracks(result.tracks)}
    assert found == set(ts.lineage)
    res = result.to_ctc(tmp_path / "01_RES")
    gt = write_ctc_ground_truth(ts, tmp_path / "01_GT")
    scores = evaluate_ctc(res, gt)
    for measure in ("TRA", "DET", "SEG", "LNK", "BC", "CT", "DIV_F1"):
        assert scores[measure] == pytest.approx(1.0), measure


def test_cost_follows_the_live_cells_not_every_cell_seen(colony):
    ts = colony
    fake = GroundTruthPredictor(ts.labels, lineage=ts.lineage)
    segment_stack(ts.image, points=ts.clicks(0), predictor=fake, progress=False,
                  detect_divisions=True, lost_after=LOST)
    steps = _last_steps(fake.steps)
    (left,) = [(lab, e) for lab, b, e, p in ts.lineage if e < ts.n_frames - 1 and lab not in dict(
        (p, 1) for _, _, _, p in ts.lineage)]
    for t in range(ts.n_frames):
        # a divided parent is no longer tracked from its daughters' first frame; the cell that left is
        # tracked until it has been gone LOST frames
        expected = _live(ts, t) + (1 if left[1] < t <= left[1] + LOST else 0)
        assert steps[t] == expected, t
    assert max(steps.values()) == 8 and len(ts.lineage) == 15
    ended = [e for e in fake.log if e[0] == "end"]
    assert len(ended) == 8  # 7 mothers and the cell that left
    assert ("end", left[1] + 1, ended[-1][2]) in ended


def test_without_ending_lost_cells_they_keep_costing():
    gt = np.zeros((12, 24, 24), np.uint16)
    gt[:4, 4:10, 4:10] = 1  # leaves after frame 3
    gt[:, 14:20, 14:20] = 2
    kwargs = dict(points=[[0, 6, 6, 1], [0, 16, 16, 2]], progress=False, detect_divisions=True)
    fake = GroundTruthPredictor(gt)
    segment_stack(gt.astype(np.float32), predictor=fake, lost_after=None, **kwargs)
    assert set(_last_steps(fake.steps).values()) == {2}
    fake = GroundTruthPredictor(gt)
    result = segment_stack(gt.astype(np.float32), predictor=fake, lost_after=2, **kwargs)
    steps = _last_steps(fake.steps)
    assert [steps[t] for t in range(12)] == [2] * 6 + [1] * 6  # tracked on frames 4, 5 (absent), ended from 4
    assert ("end", 4, 1) in fake.log and np.isnan(result.scores[1][4:]).all()
    assert sorted(ctc_tracks(result.tracks)) == [(1, 0, 3, 0), (2, 0, 11, 0)]
    with pytest.raises(ValueError, match="lost_after"):
        segment_stack(gt.astype(np.float32), predictor=GroundTruthPredictor(gt), lost_after=0, **kwargs)


def _comeback(gap: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Cell 1 is hidden for ``gap`` frames from frame 3, then back (the ground truth calls it 3 after a
    long absence: a new cell for the CTC); cell 2 stays."""
    frames = 12
    gt = np.zeros((frames, 24, 24), np.uint16)
    gt[:, 14:20, 14:20] = 2
    back = 3 + gap
    gt[:3, 4:10, 4:10] = 1
    gt[back:, 4:10, 4:10] = 1
    return gt, back


def test_short_absence_stays_one_track_and_ctc_splits_it(tmp_path):
    gt, back = _comeback(gap=2)  # shorter than lost_after
    fake = GroundTruthPredictor(gt)
    result = segment_stack(gt.astype(np.float32), points=[[0, 6, 6, 1], [0, 16, 16, 2]], predictor=fake,
                           progress=False, detect_divisions=True, lost_after=LOST)
    assert np.array_equal(np.asarray(result.labels), gt)  # SAM2's id kept through the occlusion
    res = result.to_ctc(tmp_path / "res")
    # the CTC's rule: the part after the gap is a new track whose parent is the part before it
    assert sorted(read_ctc_tracks(res / "res_track.txt")) == [(1, 0, 2, 0), (2, 0, 11, 0), (3, back, 11, 1)]
    assert (tifffile.imread(res / f"mask{back:03d}.tif")[6, 6], tifffile.imread(res / "mask000.tif")[6, 6]) == (3, 1)
    truth = SyntheticTimelapse(image=gt, labels=gt, lineage=[(1, 0, 11, 0), (2, 0, 11, 0)], positions=None)
    gt_dir = write_ctc_ground_truth(truth, tmp_path / "gt")  # the ground truth is split the same way
    assert sorted(read_ctc_tracks(gt_dir / "TRA" / "man_track.txt")) == [(1, 0, 2, 0), (2, 0, 11, 0), (3, back, 11, 1)]
    assert evaluate_ctc(res, gt_dir)["TRA"] == pytest.approx(1.0)


def test_long_absence_ends_the_track_and_the_return_is_a_new_track(tmp_path):
    gt, back = _comeback(gap=5)
    truth_labels = gt.copy()
    truth_labels[back:][truth_labels[back:] == 1] = 3  # gone that long, the CTC's truth has a new cell
    fake = GroundTruthPredictor(gt)
    new = NewObjectParams(every=1, min_area=1, mask_source=lambda image, t: [gt[t] == lab for lab in (1, 2) if (gt[t] == lab).any()])
    result = segment_stack(gt.astype(np.float32), points=[[0, 6, 6, 1], [0, 16, 16, 2]], predictor=fake,
                           progress=False, detect_new=new, lost_after=LOST)
    assert ("end", 3, 1) in fake.log  # ended on its first empty frame once gone LOST frames
    assert sorted(ctc_tracks(result.tracks)) == [(1, 0, 2, 0), (2, 0, 11, 0), (3, back, 11, 0)]  # not re-identified
    truth = SyntheticTimelapse(image=gt, labels=truth_labels, lineage=[(1, 0, 2, 0), (2, 0, 11, 0), (3, back, 11, 0)],
                               positions=None)
    scores = evaluate_ctc(result.to_ctc(tmp_path / "res"), write_ctc_ground_truth(truth, tmp_path / "gt"))
    assert scores["TRA"] == pytest.approx(1.0)


def test_write_ctc_splits_every_gap_and_keeps_daughters_on_the_last_part(tmp_path):
    labels = np.zeros((9, 16, 16), np.uint16)
    labels[[0, 1, 3, 5], 2:6, 2:6] = 4  # three parts: 0-1, 3, 5
    labels[6:, 2:6, 2:6] = 7  # daughters of 4
    labels[6:, 9:13, 9:13] = 8
    res = write_ctc(tmp_path / "res", labels, tracks=[(4, 0, 5, 0), (7, 6, 8, 4), (8, 6, 8, 4)])
    assert sorted(read_ctc_tracks(res / "res_track.txt")) == [(4, 0, 1, 0), (7, 6, 8, 10), (8, 6, 8, 10),
                                                                (9, 3, 3, 4), (10, 5, 5, 9)]
    assert [int(tifffile.imread(res / f"mask{t:03d}.tif")[3, 3]) for t in (0, 3, 5, 6)] == [4, 9, 10, 7]
    full = np.zeros((4, 8, 8), np.uint16)
    full[[0, 2, 3], 1:3, 1:3] = 65535
    with pytest.raises(ValueError, match="16-bit"):
        write_ctc(tmp_path / "full", full)
    assert not (tmp_path / "full").exists()


def _ellipse(shape, cy, cx, a, b):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / b) ** 2 + ((xx - cx) / a) ** 2 <= 1


def test_touching_daughters_split_at_their_neck_a_single_cell_never():
    shape = (40, 60)
    left, right = _ellipse(shape, 20, 20, 8, 10), _ellipse(shape, 20, 36, 8, 10)  # tangent: a 1-3 px neck
    both = left | right
    assert int(np.unique(both).size) == 2 and _split(both, DivisionParams(neck=0)) is None
    parts = _split(both, DivisionParams())
    assert parts is not None
    for part, truth in zip(sorted(parts, key=lambda m: np.argwhere(m)[:, 1].mean()), (left, right)):
        assert (part & truth).sum() / (part | truth).sum() > 0.9
    for a, b in ((8, 10), (20, 6), (3, 3)):  # convex cells, thin or round, never fall apart
        assert _split(_ellipse(shape, 20, 30, a, b), DivisionParams(neck=4)) is None
    with pytest.raises(ValueError, match="neck"):
        DivisionParams(neck=-1)


# ------------------------------------------------------------------------- the real predictor


@pytest.fixture(scope="module")
def predictor():
    return VideoPredictor(random_model(128, seed=0))


def test_end_object_stops_tracking_frees_memory_and_a_prompt_revives(predictor, colony):
    video = colony.image[:8]
    state = predictor.init_state(video, history="disk")
    for obj, (y, x) in ((1, (40, 40)), (2, (90, 90))):
        predictor.add_new_points_or_box(state, 0, obj, points=[[x, y]], labels=[1])
    ids = [ids for _, ids, _ in predictor.propagate_in_video(state)]
    assert ids == [[1, 2]] * 8
    predictor.end_object(state, 1, 3)
    obj = state.objects[1]
    assert state.track_end(1) == 3 and state.track_end(2) is None
    assert obj.non_cond.frames() == [1, 2] and len(obj.non_cond._ram) == 0  # later frames dropped, RAM released
    assert np.isnan(state.object_score_logits(1)[3:]).all() and not np.isnan(state.object_score_logits(1)[:3]).any()
    seen = [(t, ids) for t, ids, masks in predictor.propagate_in_video(state)]
    assert seen == [(t, [1, 2] if t < 3 else [2]) for t in range(8)]
    back = [ids for _, ids, _ in predictor.propagate_in_video(state, start_frame_idx=7, reverse=True)]
    assert back == [[2]] * 5 + [[1, 2]] * 3  # frames 7..3 without it, 2..0 with it
    with pytest.raises(ValueError, match="prompts on frame"):
        predictor.end_object(state, 2, 0)
    predictor.add_new_points_or_box(state, 5, 1, points=[[40, 40]], labels=[1])  # the user brings it back
    assert state.track_end(1) is None
    assert [ids for _, ids, _ in predictor.propagate_in_video(state, start_frame_idx=5)] == [[1, 2]] * 3
    predictor.close(state)


def test_every_track_ended_yields_empty_frames(predictor, colony):
    state = predictor.init_state(colony.image[:4], history="ram")
    predictor.add_new_points_or_box(state, 0, 1, points=[[40, 40]], labels=[1])
    list(predictor.propagate_in_video(state))
    predictor.end_object(state, 1, 2)
    out = [(t, ids, tuple(m.shape)) for t, ids, m in predictor.propagate_in_video(state)]
    assert out[2:] == [(2, [], (0, 1, 128, 128)), (3, [], (0, 1, 128, 128))]
    predictor.close(state)


def test_real_network_three_generations_end_to_end(predictor, colony, tmp_path):
    """The whole colony through the real predictor (prompts, memories, tracking steps, ended tracks),
    steered by the ground truth (random weights cannot find cells): the lineage is right and the network
    tracks only the live cells."""
    ts = colony
    steered = GroundTruthSteering(predictor, ts.labels, ts.lineage)
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=steered, progress=False,
                           detect_divisions=True, lost_after=LOST, out=tmp_path / "labels.zarr")
    assert len(result.parents) == 14
    steps = _last_steps(steered.steps)
    assert max(steps.values()) == 8 and all(steps[t] <= _live(ts, t) + 1 for t in range(ts.n_frames))
    scores = evaluate_ctc(result.to_ctc(tmp_path / "res"), write_ctc_ground_truth(ts, tmp_path / "gt"))
    assert scores["TRA"] == pytest.approx(1.0) and scores["BC"] == pytest.approx(1.0)
    begins = {}
    for _, b, _, mother in ctc_tracks(result.tracks):
        if mother:
            begins[mother] = b
    for mother, b in begins.items():  # a mother's track ends where its daughters' begin
        assert np.isnan(result.scores[mother][b:]).all() and not np.isnan(result.scores[mother][b - 1])


def test_evaluate_straight_from_geff_and_ome_zarr(colony, tmp_path, capsys):
    ts = colony
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=GroundTruthPredictor(ts.labels, lineage=ts.lineage),
                           progress=False, detect_divisions=True, lost_after=LOST)
    gt = write_ctc_ground_truth(ts, tmp_path / "gt")
    from_ctc = evaluate_ctc(result.to_ctc(tmp_path / "res"), gt)
    geff = result.to_geff(tmp_path / "colony.geff")
    assert evaluate_ctc(geff, gt) == from_ctc and from_ctc["TRA"] == pytest.approx(1.0)
    assert main(["evaluate", str(geff), str(gt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(dict(from_ctc))
    assert main(["convert", str(geff), str(tmp_path / "labels.ome.zarr")]) == 0  # + labels.tracks.csv
    assert evaluate_ctc(tmp_path / "labels.ome.zarr", gt) == from_ctc
    capsys.readouterr()
    # the errors name the result
    assert main(["evaluate", str(tmp_path / "missing.geff"), str(gt)]) == 1
    assert "missing.geff" in capsys.readouterr().err
    other = make_colony(n_frames=30, shape=(128, 128), seed=0)
    short = write_ctc_ground_truth(other, tmp_path / "gt30")
    with pytest.raises(ValueError, match=r"colony.geff \(as CTC\)' has 40 frames"):
        evaluate_ctc(geff, short)


def test_a_geff_with_a_gap_is_scored_with_the_gap_split(tmp_path):
    gt, back = _comeback(gap=2)
    result = segment_stack(gt.astype(np.float32), points=[[0, 6, 6, 1], [0, 16, 16, 2]], predictor=GroundTruthPredictor(gt),
                           progress=False, detect_divisions=True, lost_after=LOST)
    truth = SyntheticTimelapse(image=gt, labels=gt, lineage=[(1, 0, 11, 0), (2, 0, 11, 0)], positions=None)
    scores = evaluate_ctc(result.to_geff(tmp_path / "gap.geff"), write_ctc_ground_truth(truth, tmp_path / "gt"))
    assert scores["TRA"] == pytest.approx(1.0) and scores["DET"] == pytest.approx(1.0)
