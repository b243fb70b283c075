"""`napari-sam2 evaluate` and evaluate_ctc: the Cell Tracking Challenge measures (py-ctcmetrics) and the
division F1 (traccuracy) against CTC ground truth, checked against py-ctcmetrics' own command line;
`segment --detect-new K --detect-divisions` end to end (random weights: plumbing only)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_sam2.cli import main
from napari_sam2.evaluate import MEASURES, CTCLayoutError, evaluate_ctc
from napari_sam2.io import read_ctc_tracks, write_ctc
from napari_sam2.synthetic import make_timelapse, write_ctc_ground_truth


def _with_second_division(ts):
    """The synthetic movie has one generation of divisions; a daughter that divides again gives the
    ground truth a complete cell cycle (a track from a division to a division), without which CCA
    is undefined."""
    labels, rows = ts.labels.copy(), {r[0]: list(r) for r in ts.lineage}
    last = ts.n_frames - 1
    daughter = next(r[0] for r in ts.lineage if r[3] and r[2] == last and r[1] <= last - 3)
    a, b = max(rows) + 1, max(rows) + 2
    for t in (last - 1, last):
        ys, xs = np.nonzero(labels[t] == daughter)
        left = xs <= np.median(xs)
        labels[t][ys[left], xs[left]] = a
        labels[t][ys[~left], xs[~left]] = b
    rows[daughter][2] = last - 2
    rows[a], rows[b] = [a, last - 1, last, daughter], [b, last - 1, last, daughter]
    return dataclasses.replace(ts, labels=labels, lineage=[tuple(r) for r in rows.values()])


def _perturbed(ts, kind):
    """A valid CTC result that differs from the ground truth in one way."""
    labels, rows = ts.labels.copy(), {r[0]: list(r) for r in ts.lineage}
    parents = {r[3] for r in ts.lineage}
    plain = [r[0] for r in ts.lineage if r[3] == 0 and r[0] not in parents and r[2] - r[1] >= 3]
    new = max(rows) + 1
    if kind == "relabelled":  # an identity switch half-way through a track
        lab = plain[0]
        t = (rows[lab][1] + rows[lab][2] + 1) // 2
        labels[t:][labels[t:] == lab] = new
        rows[new], rows[lab][2] = [new, t, rows[lab][2], 0], t - 1
    elif kind == "dropped":  # a cell missed in one frame: the CTC links the two pieces as parent and child
        lab = plain[0]
        t = rows[lab][1] + 1
        labels[t][labels[t] == lab] = 0
        labels[t + 1:][labels[t + 1:] == lab] = new
        rows[new], rows[lab][2] = [new, t + 1, rows[lab][2], lab], t - 1
    elif kind == "missed_division":  # the second-generation daughters start as new cells
        for r in rows.values():
            if r[3] and rows[r[3]][3]:
                r[3] = 0
    elif kind == "truncated":  # a cell lost on its last frame, and another one's mask eroded on one frame
        lab, other = plain[0], plain[1]
        labels[rows[lab][2]][labels[rows[lab][2]] == lab] = 0
        rows[lab][2] -= 1
        t = rows[other][1] + 1
        ys, xs = np.nonzero(labels[t] == other)
        labels[t][ys[ys == ys.min()], xs[ys == ys.min()]] = 0
    return labels, [tuple(r) for r in rows.values()]


KINDS = ("relabelled", "dropped", "missed_division", "truncated")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    ts = _with_second_division(make_timelapse(n_frames=8, shape=(48, 48), n_cells=3, seed=0))
    root = tmp_path_factory.mktemp("ctc")
    gt = write_ctc_ground_truth(ts, root / "01_GT")
    perfect = write_ctc(root / "perfect", ts.labels, tracks=ts.lineage)
    perturbed = {kind: write_ctc(root / kind, *_perturbed(ts, kind)) for kind in KINDS}
    return ts, gt, perfect, perturbed


@pytest.fixture(scope="module")
def gt_without_seg(folders, tmp_path_factory):
    copy = shutil.copytree(folders[1], tmp_path_factory.mktemp("noseg") / "01_GT")
    shutil.rmtree(copy / "SEG")
    return copy


def _ctc_evaluate(res, gt, tmp_path):
    """py-ctcmetrics' console script on the folders: {name: value} from its printed table and its CSV."""
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "ctc_evaluate"]
    module, attr = script.value.split(":")
    table = tmp_path / "ctc.csv"
    run = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {attr} as m; "
                          f"sys.argv[0] = {script.name!r}; sys.exit(m())",
                          "--res", str(res), "--gt", str(gt), "-n", "1", "--csv-file", str(table)],
                         capture_output=True, text=True, timeout=120, check=True)
    printed = {m.group(1): None if m.group(2) == "N/A" else float(m.group(2))
               for m in re.finditer(r"^([A-Za-z_0-9()-]+): (\S+)$", run.stdout, re.MULTILINE)}
    with open(table, newline="") as f:
        header, values = list(csv.reader(f, delimiter=";"))
    stored = {k: None if v == "None" else float(v) for k, v in zip(header, values)}
    return printed, stored


def test_perfect_result_scores_1_on_every_measure(folders):
    ts, gt, perfect, _ = folders
    assert len([r for r in ts.lineage if r[3]]) == 4  # two divisions, one a complete cell cycle
    scores = evaluate_ctc(perfect, gt)
    assert scores.absent == {} and list(scores) == list(MEASURES)
    assert all(v == pytest.approx(1.0) for v in scores.values()), dict(scores)
    assert scores.library["DIV_F1"] == "traccuracy" and scores.library["TRA"] == "py-ctcmetrics"


@pytest.mark.parametrize("kind", KINDS)
def test_each_measure_equals_py_ctcmetrics_command_line(folders, kind, tmp_path):
    _, gt, _, perturbed = folders
    scores = evaluate_ctc(perturbed[kind], gt)
    printed, stored = _ctc_evaluate(perturbed[kind], gt, tmp_path)
    assert stored["Valid"] == 1
    names = {m: m for m in MEASURES} | {"BC": "BC(0)", "BIO": "BIO(0)", "OP_CLB": "OP_CLB(0)"}
    for m in MEASURES:
        if m == "DIV_F1":
            continue
        assert m in scores, (m, scores.absent)
        assert scores[m] == stored[names[m]], m  # the CSV holds full precision
        assert scores[m] == pytest.approx(printed[names[m]], rel=1e-4, abs=1e-12), m  # printed to 5 digits
    # the perturbation is seen: not a comparison of perfect scores
    lower = {"relabelled": ("TRA", "LNK", "CT", "CHOTA"), "dropped": ("DET", "TRA", "SEG", "CT"),
             "missed_division": ("TRA", "BC", "CCA", "BIO", "DIV_F1"), "truncated": ("DET", "SEG", "TRA")}[kind]
    assert all(scores[m] < 1 for m in lower), dict(scores)


def test_without_seg_ground_truth_seg_measures_are_absent(folders, gt_without_seg):
    _, gt, _, perturbed = folders
    with_seg = evaluate_ctc(perturbed["truncated"], gt)
    scores = evaluate_ctc(perturbed["truncated"], gt_without_seg)
    assert set(scores.absent) == {"SEG", "OP_CSB", "OP_CTB"} and all("SEG" in why for why in scores.absent.values())
    assert dict(scores) == {m: v for m, v in with_seg.items() if m not in scores.absent}


def test_undefined_measures_are_absent_not_zero(folders, tmp_path):
    ts = make_timelapse(n_frames=6, shape=(48, 48), n_cells=2, divide=False, seed=1)
    gt = write_ctc_ground_truth(ts, tmp_path / "gt")
    scores = evaluate_ctc(write_ctc(tmp_path / "res", ts.labels, tracks=ts.lineage), gt)
    assert set(scores.absent) == {"BC", "CCA", "DIV_F1"} and "no division" in scores.absent["BC"]
    assert scores["BIO"] == pytest.approx(1.0)  # the mean of the defined ones, CT and TF
    merged = (ts.labels > 0).astype(np.uint16)  # one result object over every cell
    scores = evaluate_ctc(write_ctc(tmp_path / "merged", merged), gt)
    assert "one-to-one" in scores.absent["DIV_F1"] and scores["DET"] < 1


def test_seg_is_the_ctc_jaccard_measure(tmp_path):
    # a reference object matches the result object covering more than half of it; SEG is its Jaccard index
    gt0 = np.zeros((10, 10), np.uint16)
    gt0[0:4, 0:4] = 1
    gt0[6:10, 6:10] = 2
    pred = gt0.copy()
    pred[6:10, 6:8] = 0  # exactly half of object 2 left: not a match (> 0.5 needed)
    pred[0:4, 4] = 1  # object 1 with 4 extra pixels: J = 16 / 20
    gt = tmp_path / "gt"
    for sub, prefix in (("TRA", "man_track"), ("SEG", "man_seg")):
        (gt / sub).mkdir(parents=True)
        for t in range(2):
            tifffile.imwrite(gt / sub / f"{prefix}{t:03d}.tif", gt0)
    (gt / "TRA" / "man_track.txt").write_text("1 0 1 0\n2 0 1 0\n")
    scores = evaluate_ctc(write_ctc(tmp_path / "res", np.stack([pred, pred])), gt)
    assert scores["SEG"] == pytest.approx((16 / 20 + 0) / 2)


def test_cli_json_keys_and_table(folders, gt_without_seg, capsys):
    _, gt, perfect, perturbed = folders
    assert main(["evaluate", str(perfect), str(gt), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(MEASURES) and all(v == pytest.approx(1) for v in out.values())
    assert main(["evaluate", str(perturbed["truncated"]), str(gt_without_seg), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) == set(MEASURES) - {"SEG", "OP_CSB", "OP_CTB"}
    assert "SEG not computed" in captured.err and out["DET"] == evaluate_ctc(perturbed["truncated"], gt)["DET"]
    assert main(["evaluate", str(perturbed["truncated"]), str(gt_without_seg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:len(MEASURES) + 1]}
    assert list(rows) == list(MEASURES)
    assert rows["SEG"][1] == "n/a" and rows["DET"][1] == f"{out['DET']:.6f}" and rows["DIV_F1"][2] == "traccuracy"
    assert main(["evaluate", str(perfect), str(gt), "--json", "--bc", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["BC"] == pytest.approx(1)


def test_bad_layouts_are_clear_errors(folders, tmp_path, capsys):
    ts, gt, perfect, _ = folders
    with pytest.raises(CTCLayoutError, match="not in the CTC layout"):
        evaluate_ctc(perfect, perfect)  # a result folder given as ground truth
    with pytest.raises(CTCLayoutError, match="res_track.txt"):
        evaluate_ctc(gt / "TRA", gt)
    with pytest.raises(CTCLayoutError, match="does not exist"):
        evaluate_ctc(tmp_path / "nowhere", gt)
    short = write_ctc(tmp_path / "short", ts.labels[:4])
    message = f"the result '{short}' has 4 frames but the ground truth '{gt}' has 8"
    with pytest.raises(CTCLayoutError, match=re.escape(message)):
        evaluate_ctc(short, gt)
    assert main(["evaluate", str(short), str(gt), "--json"]) == 1
    assert message in capsys.readouterr().err
    broken = shutil.copytree(perfect, tmp_path / "broken")
    (broken / "res_track.txt").write_text("1 0 0 0\n")  # does not describe the masks
    with pytest.raises(CTCLayoutError, match="does not match"):
        evaluate_ctc(broken, gt)
    empty = write_ctc(tmp_path / "empty", np.zeros_like(ts.labels))
    with pytest.raises(CTCLayoutError, match="has no cells"):
        evaluate_ctc(empty, gt)


def test_different_image_shapes_name_both_folders(folders, tmp_path):
    ts, gt, _, _ = folders
    wide = write_ctc(tmp_path / "wide", np.pad(ts.labels, ((0, 0), (0, 0), (0, 4))), tracks=ts.lineage)
    message = (f"ground truth '{gt / 'TRA'}' frame man_track000.tif has shape (48, 48) but the result "
               f"'{wide}' frames have shape (48, 52)")
    with pytest.raises(CTCLayoutError, match=re.escape(message)):
        evaluate_ctc(wide, gt)
    odd = shutil.copytree(folders[2], tmp_path / "odd")
    tifffile.imwrite(odd / "mask005.tif", np.zeros((40, 48), np.uint16))
    with pytest.raises(CTCLayoutError, match=re.escape(f"result '{odd}' frame mask005.tif has shape (40, 48)")):
        evaluate_ctc(odd, gt)
    one = write_ctc(tmp_path / "one", ts.labels[:1])
    gt1 = write_ctc_ground_truth(dataclasses.replace(ts, image=ts.image[:1], labels=ts.labels[:1],
                                                     lineage=[(r[0], 0, 0, 0) for r in ts.lineage if r[1] == 0]),
                                 tmp_path / "gt1")
    with pytest.raises(CTCLayoutError, match="single frame"):
        evaluate_ctc(one, gt1)


def test_inconsistent_tracks_name_label_and_frame(folders, tmp_path):
    ts, gt, perfect, _ = folders
    lab, begin, end, _ = next(r for r in ts.lineage if r[2] - r[1] >= 3)
    gap = shutil.copytree(perfect, tmp_path / "gap")  # the label vanishes inside its track
    frame = tifffile.imread(gap / f"mask{begin + 1:03d}.tif")
    tifffile.imwrite(gap / f"mask{begin + 1:03d}.tif", np.where(frame == lab, 0, frame).astype(np.uint16))
    with pytest.raises(CTCLayoutError, match=rf"Missing IDs in masks at t={begin + 1}: \{{{lab}\}}"):
        evaluate_ctc(gap, gt)
    unlisted = shutil.copytree(perfect, tmp_path / "unlisted")  # a label in the masks, not in res_track.txt
    rows = [line for line in (unlisted / "res_track.txt").read_text().splitlines() if int(line.split()[0]) != lab]
    (unlisted / "res_track.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(CTCLayoutError, match=rf"IDs \{{{lab}\}} at t={begin} not represented in tracks file"):
        evaluate_ctc(unlisted, gt)


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
