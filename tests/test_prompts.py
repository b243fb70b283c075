"""Prompts: napari arrays, tables and files -> one prompt per (frame, object), validated against the stack."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_sam2.prompts import (
    PromptError,
    boxes_table,
    build_prompts,
    points_table,
    read_prompts_file,
)


class RecordingPredictor:
    """Records what Prompts.apply gives a video predictor."""

    def __init__(self):
        self.calls = []

    def add_new_points_or_box(self, state, frame_idx, obj_id, points=None, labels=None, box=None):
        self.calls.append(("points", frame_idx, obj_id, None if points is None else np.asarray(points).tolist(),
                           None if labels is None else np.asarray(labels).tolist(), box))

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self.calls.append(("mask", frame_idx, obj_id, np.asarray(mask).copy()))


# ------------------------------------------------------------------------------------ arrays
def test_napari_points_each_point_is_an_object():
    prompts = build_prompts(np.array([[0, 10, 20], [0, 30, 5.5], [2, 1, 2]]))
    assert prompts.obj_ids == [1, 2, 3]
    assert prompts.frames == [0, 2]
    p = prompts.items[(0, 2)]
    assert p.points.tolist() == [[30, 5.5]]  # (y, x), napari order
    assert p.xy_points().tolist() == [[5.5, 30]]  # (x, y) for SAM2
    assert p.positive.tolist() == [True]


def test_points_with_id_and_positive_columns_and_args():
    prompts = build_prompts(np.array([[1, 10, 10, 7, 1], [1, 12, 14, 7, 0], [1, 40, 40, 9, 1]]))
    assert prompts.obj_ids == [7, 9]
    assert prompts.items[(1, 7)].positive.tolist() == [True, False]
    same = build_prompts([[1, 10, 10], [1, 12, 14], [1, 40, 40]], obj_ids=[7, 7, 9], positive=[1, 0, True])
    assert same.items[(1, 7)].points.tolist() == prompts.items[(1, 7)].points.tolist()
    assert same.items[(1, 7)].positive.tolist() == [True, False]


def test_points_table_aliases():
    df = pd.DataFrame({"Frame": [0, 3], "Y": [1.0, 2.0], "X": [3.0, 4.0], "label": [5, 6], "positive": ["yes", "false"]})
    table = points_table(df)
    assert table["t"].tolist() == [0, 3]
    assert table["obj_id"].tolist() == [5, 6]
    assert table["positive"].tolist() == [True, False]
    napari_csv = {"index": [0, 1], "axis-0": [2, 2], "axis-1": [5, 6], "axis-2": [7, 8]}
    prompts = build_prompts(napari_csv)
    assert prompts.items[(2, 1)].points.tolist() == [[5, 7]]


def test_negative_click_needs_an_object_id():
    with pytest.raises(PromptError, match=r"points row 1: a negative click"):
        build_prompts([[0, 1, 1], [0, 2, 2]], positive=[1, 0])
    with pytest.raises(PromptError, match="only negative clicks"):
        build_prompts([[0, 1, 1, 4, 0]])


@pytest.mark.parametrize(
    "points, message",
    [
        (np.zeros((3, 2)), r"\(N, 3\) array of t, y, x"),
        ([[0.5, 1, 1]], r"points row 0: the frame t must be a whole number"),
        ([[0, np.nan, 1]], r"points row 0: y"),
        ([[0, 1, 1, 0]], r"points row 0: object id 0 must be an integer >= 1"),
        ([[0, 1, 1, 1, 2]], r"points row 0: positive must be 1/true"),
    ],
)
def test_bad_points(points, message):
    with pytest.raises(PromptError, match=message):
        build_prompts(points)


def test_points_table_missing_columns():
    with pytest.raises(PromptError, match=r"points lack column\(s\) x; found columns 't', 'y'"):
        build_prompts(pd.DataFrame({"t": [0], "y": [1]}))


def test_boxes_arrays_and_napari_rectangles():
    prompts = build_prompts(boxes=np.array([[0, 1, 2, 11, 12], [3, 5, 5, 9, 9]]))
    assert prompts.obj_ids == [1, 2]
    assert prompts.items[(0, 1)].box == (1, 2, 11, 12)
    assert prompts.items[(0, 1)].xyxy_box() == [2, 1, 12, 11]
    rect = np.array([[[4, 10, 3], [4, 10, 9], [4, 2, 9], [4, 2, 3]]], dtype=float)  # corners in any order
    prompts = build_prompts(boxes=rect, box_ids=[5])
    assert prompts.items[(4, 5)].box == (2, 3, 10, 9)
    with pytest.raises(PromptError, match="different frames"):
        build_prompts(boxes=np.array([[[4, 1, 1], [4, 1, 5], [5, 5, 5], [4, 5, 1]]], dtype=float))


def test_box_rows_are_checked():
    with pytest.raises(PromptError, match=r"boxes row 1: box .* has y1 < y0"):
        boxes_table([[0, 1, 1, 5, 5], [0, 9, 1, 5, 5]])
    with pytest.raises(PromptError, match="already has a box on frame 0"):
        build_prompts(boxes=[[0, 1, 1, 5, 5, 3], [0, 2, 2, 6, 6, 3]])


def test_points_and_box_for_one_object_and_auto_numbering():
    masks = np.zeros((8, 8), np.uint16)
    masks[1:3, 1:3] = 4
    prompts = build_prompts(
        points=[[0, 2, 2, 10, 1], [0, 5, 5, np.nan, 1]],  # object 10, and an unnumbered click
        boxes=[[0, 1, 1, 4, 4, 10], [1, 0, 0, 3, 3, np.nan]],  # a box for object 10, and an unnumbered box
        masks=masks, mask_frame=2,
    )
    # unnumbered prompts are numbered after the largest given id (10), points first
    assert prompts.obj_ids == [4, 10, 11, 12]
    p = prompts.items[(0, 10)]
    assert p.box == (1, 1, 4, 4) and p.points.tolist() == [[2, 2]]
    assert (0, 11) in prompts.items and (1, 12) in prompts.items
    assert prompts.items[(2, 4)].mask.sum() == 4


def test_mask_label_image():
    labels = np.zeros((6, 7), np.uint8)
    labels[0:2, 0:2] = 3
    labels[4:6, 4:7] = 8
    prompts = build_prompts(masks=labels, mask_frame=5)
    assert prompts.frames == [5] and prompts.obj_ids == [3, 8]
    assert prompts.items[(5, 8)].mask.sum() == 6
    with pytest.raises(PromptError, match=r"label image of one frame, \(Y, X\)"):
        build_prompts(masks=np.zeros((3, 6, 7), np.uint8))
    with pytest.raises(PromptError, match="negative labels"):
        build_prompts(masks=-np.ones((6, 7), np.int16))
    with pytest.raises(PromptError, match="both a mask"):
        build_prompts(points=[[0, 1, 1, 3]], masks=labels)


# ------------------------------------------------------------------------------------ checks
def test_empty_prompts_are_an_error_not_automatic_seeding():
    assert not build_prompts()  # nothing given: segment_stack seeds automatically
    with pytest.raises(PromptError, match="the prompts given are empty"):
        build_prompts(np.zeros((0, 3)))  # an empty napari Points layer
    with pytest.raises(PromptError, match="the prompts given are empty"):
        build_prompts(masks=np.zeros((5, 5), np.uint8))
    assert build_prompts(np.zeros((0, 3)), boxes=[[0, 1, 1, 2, 2]]).obj_ids == [1]


def test_check_names_the_row_outside_the_stack():
    prompts = build_prompts([[0, 1, 1], [1, 2, 2], [7, 3, 3]])
    with pytest.raises(PromptError, match=r"points row 2: frame t=7 is outside the stack: the stack is 6 frames of 16 x 20 .*frames 0..5"):
        prompts.check(6, 16, 20)
    prompts = build_prompts([[0, 1, 1], [1, 15.6, 2]])
    with pytest.raises(PromptError, match=r"points row 1: point \(y=15.6, x=2\) on frame 1 lies outside the frame"):
        prompts.check(6, 16, 20)
    build_prompts([[0, 15.4, 19.4], [0, -0.5, -0.5]]).check(6, 16, 20)  # on the frame's pixels: fine
    with pytest.raises(PromptError, match=r"boxes row 0: box .* reaches outside the frame"):
        build_prompts(boxes=[[0, 0, 0, 16, 10]]).check(6, 16, 20)
    with pytest.raises(PromptError, match=r"mask label image has shape \(6, 7\)"):
        build_prompts(masks=np.ones((6, 7), np.uint8)).check(6, 16, 20)


def test_apply_converts_to_xy_and_clips():
    prompts = build_prompts(points=[[0, -0.4, 19.4, 1, 1], [0, 3, 4, 1, 0]], boxes=[[1, 2, 3, 15.5, 19.5, 2]],
                            masks=np.pad(np.ones((2, 2), np.uint8) * 5, ((0, 14), (0, 18))), mask_frame=3)
    prompts.check(4, 16, 20)
    rec = RecordingPredictor()
    prompts.apply(rec, state=None, width=20, height=16)
    kinds = [(c[0], c[1], c[2]) for c in rec.calls]
    assert kinds == [("points", 0, 1), ("points", 1, 2), ("mask", 3, 5)]
    _, _, _, pts, labels, box = rec.calls[0]
    assert pts == [[pytest.approx(19.4), 0.0], [4.0, 3.0]]  # (x, y), y clipped to 0
    assert labels == [1, 0] and box is None
    _, _, _, pts, labels, box = rec.calls[1]
    assert pts is None and labels is None
    assert box == [3.0, 2.0, 19.5, 15.5]  # (x0, y0, x1, y1)
    assert rec.calls[2][3].sum() == 4


# ------------------------------------------------------------------------------------ files
def test_csv_with_points_and_boxes(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("t,y,x,obj_id,positive,y0,x0,y1,x1\n"
                    "0,5,6,1,1,,,,\n"
                    "0,7,8,1,0,,,,\n"
                    "2,,,2,,1,1,9,9\n")
    data = read_prompts_file(path)
    prompts = build_prompts(data["points"], data["boxes"])
    assert prompts.obj_ids == [1, 2]
    assert prompts.items[(0, 1)].positive.tolist() == [True, False]
    assert prompts.items[(2, 2)].box == (1, 1, 9, 9)
    with pytest.raises(PromptError, match=r"'prompts.csv' line 4: frame t=2 is outside the stack"):
        prompts.check(2, 10, 10)


def test_csv_errors_name_file_line_and_columns(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("t,y,obj_id\n0,5,1\n")
    with pytest.raises(PromptError, match=r"points in '.*clicks.csv' lack column\(s\) x"):
        read_prompts_file(path)
    path.write_text("t,y,x\n0,5,1\n0,abc,1\n")
    with pytest.raises(PromptError, match=r"'clicks.csv' line 3: y 'abc' in column 'y' is not a finite number"):
        read_prompts_file(path)
    path.write_text("frame,row,col\n0,1,1\n")
    with pytest.raises(PromptError, match=r"lack column\(s\) y, x"):
        read_prompts_file(path)
    with pytest.raises(PromptError, match="unknown prompts file type '.txt'"):
        (tmp_path / "p.txt").write_text("x")
        read_prompts_file(tmp_path / "p.txt")
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.csv")


def test_json_forms(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"points": [[0, 5, 6, 1, 1], [0, 7, 8, 1, 0]], "boxes": [{"t": 1, "y0": 0, "x0": 0, "y1": 4, "x1": 4, "obj_id": 2}]}))
    data = read_prompts_file(path)
    prompts = build_prompts(data["points"], data["boxes"])
    assert prompts.obj_ids == [1, 2] and prompts.items[(1, 2)].box == (0, 0, 4, 4)
    path.write_text(json.dumps([{"t": 0, "y": 1, "x": 2, "obj_id": 3}]))
    prompts = build_prompts(**{k: v for k, v in read_prompts_file(path).items() if k != "masks"})
    assert prompts.obj_ids == [3]
    path.write_text(json.dumps({"points": [[9, 1, 1]]}))
    with pytest.raises(PromptError, match=r"'p.json' points\[0\]: frame t=9 is outside"):
        build_prompts(read_prompts_file(path)["points"]).check(3, 4, 4)
    path.write_text(json.dumps({"clicks": []}))
    with pytest.raises(PromptError, match='expected a JSON object with "points"'):
        read_prompts_file(path)
    path.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        read_prompts_file(path)


def test_label_tiff(tmp_path):
    labels = np.zeros((10, 12), np.uint16)
    labels[2:4, 2:4] = 1
    labels[6:9, 6:9] = 2
    tifffile.imwrite(tmp_path / "seed.tif", labels)
    data = read_prompts_file(tmp_path / "seed.tif")
    prompts = build_prompts(masks=data["masks"], mask_frame=1)
    assert prompts.obj_ids == [1, 2] and prompts.frames == [1]
    (tmp_path / "broken.tif").write_bytes(b"II*\x00nonsense")
    with pytest.raises(PromptError, match="not a readable TIFF label image"):
        read_prompts_file(tmp_path / "broken.tif")
