"""`napari-sam2 evaluate` and evaluate_ctc: DET / TRA (traccuracy) and SEG against CTC ground truth;
`segment --detect-new K --detect-divisions` end to end (random weights: plumbing only)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_sam2.cli import main
from napari_sam2.evaluate import CTCLayoutError, evaluate_ctc, seg_score
from napari_sam2.io import read_ctc_tracks, write_ctc
from napari_sam2.synthetic import make_timelapse, write_ctc_ground_truth


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    ts = make_timelapse(n_frames=6, shape=(48, 48), n_cells=3, seed=2)
    root = tmp_path_factory.mktemp("ctc")
    gt = write_ctc_ground_truth(ts, root / "01_GT")
    perfect = write_ctc(root / "perfect", ts.labels, tracks=ts.lineage)
    no_parents = write_ctc(root / "no_parents", ts.labels, tracks=[(label, b, e, 0) for label, b, e, _ in ts.lineage])
    return ts, gt, perfect, no_parents


def test_perfect_result_scores_1(folders):
    ts, gt, perfect, _ = folders
    assert any(p for *_, p in ts.lineage)  # the ground truth has a division
    scores = evaluate_ctc(perfect, gt)
    assert scores["DET"] == pytest.approx(1) and scores["TRA"] == pytest.approx(1) and scores["SEG"] == pytest.approx(1)


def test_missing_lineage_costs_tra_not_det(folders):
    _, gt, _, no_parents = folders
    scores = evaluate_ctc(no_parents, gt)
    assert scores["DET"] == pytest.approx(1) and scores["TRA"] < 1


def test_cli_prints_scores_and_json(folders, capsys):
    _, gt, perfect, _ = folders
    assert main(["evaluate", str(perfect), str(gt), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"DET", "TRA", "SEG"} and out["TRA"] == pytest.approx(1)
    assert main(["evaluate", str(perfect), str(gt)]) == 0
    text = capsys.readouterr().out
    assert "DET: 1.0" in text and "TRA: 1.0" in text and "SEG: 1.0" in text


def test_seg_is_optional_and_measures_jaccard(folders, tmp_path):
    ts, gt, perfect, _ = folders
    copy = shutil.copytree(gt, tmp_path / "gt")
    shutil.rmtree(copy / "SEG")
    assert "SEG" not in evaluate_ctc(perfect, copy)
    # SEG by hand: a reference object matches a result object covering more than half of it
    res = {0: tmp_path / "m0.tif"}
    gt0 = np.zeros((10, 10), np.uint16)
    gt0[0:4, 0:4] = 1
    gt0[6:10, 6:10] = 2
    pred = gt0.copy()
    pred[6:10, 6:8] = 0  # exactly half of object 2 left: not a match (> 0.5 needed)
    pred[0:4, 4] = 1  # object 1 with 4 extra pixels: J = 16 / 20
    tifffile.imwrite(res[0], pred)
    tifffile.imwrite(tmp_path / "s0.tif", gt0)
    assert seg_score(res, {0: tmp_path / "s0.tif"}) == pytest.approx((16 / 20 + 0) / 2)


def test_bad_layouts_are_clear_errors(folders, tmp_path, capsys):
    ts, gt, perfect, _ = folders
    with pytest.raises(CTCLayoutError, match="not in the CTC layout"):
        evaluate_ctc(perfect, perfect)  # a result folder given as ground truth
    with pytest.raises(CTCLayoutError, match="res_track.txt"):
        evaluate_ctc(gt / "TRA", gt)
    with pytest.raises(CTCLayoutError, match="does not exist"):
        evaluate_ctc(tmp_path / "nowhere", gt)
    short = write_ctc(tmp_path / "short", ts.labels[:4])
    with pytest.raises(CTCLayoutError, match="4 frames but the ground truth has 6"):
        evaluate_ctc(short, gt)
    broken = shutil.copytree(perfect, tmp_path / "broken")
    (broken / "res_track.txt").write_text("1 0 0 0\n")  # does not describe the masks
    with pytest.raises(CTCLayoutError, match="does not match"):
        evaluate_ctc(broken, gt)
    assert main(["evaluate", str(short), str(gt), "--json"]) == 1
    assert "4 frames but the ground truth has 6" in capsys.readouterr().err


def test_segment_flags_validation(tmp_path, capsys):
    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, make_timelapse(3, (32, 32), n_cells=1, seed=0).image, photometric="minisblack")
    base = ["segment", str(stack), "--out", str(tmp_path / "out"), "--auto", "--no-progress"]
    assert main(base + ["--detect-new", "0"]) == 1
    assert "K >= 1" in capsys.readouterr().err
    assert main(base + ["--detect-divisions", "--direction", "backward"]) == 1
    assert "forward" in capsys.readouterr().err
    assert main(base + ["--detect-new", "2", "--auto-param", "bogus=1"]) == 1
    assert "bogus" in capsys.readouterr().err


def test_segment_cli_with_detection_end_to_end(tmp_path, random_checkpoint):
    ckpt = random_checkpoint
    ts = make_timelapse(4, (48, 48), n_cells=2, seed=0)
    tifffile.imwrite(tmp_path / "s0.tif", ts.image, photometric="minisblack")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "s0.tif"), "--out", str(out), "--auto", "--format", "ctc",
                 "--detect-new", "2", "--detect-divisions", "--auto-param", "points_per_side=4",
                 "--auto-param", "pred_iou_thresh=0.0", "--auto-param", "stability_score_thresh=0.0",
                 "--auto-param", "max_objects=2",
                 "--checkpoint", str(ckpt), "--image-size", "128", "--device", "cpu", "--threads", "1", "--no-progress"])
    assert code == 0
    tracks = pd.read_csv(out / "s0.tracks.csv")
    assert "parent" in tracks.columns
    read_ctc_tracks(out / "s0_RES" / "res_track.txt")
    gt = write_ctc_ground_truth(ts, tmp_path / "gt")
    assert main(["evaluate", str(out / "s0_RES"), str(gt), "--json"]) == 0
