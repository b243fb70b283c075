"""AutomaticMaskGenerator: building blocks (NMS, boxes, grids, crops, RLE), the pipeline with the
real network (record structure, filters), and the pipeline with a test double for the mask source
(two synthetic discs must come out once each, with the right box and area)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_sam2 import build_model
from napari_sam2.predictor.amg import (
    AutomaticMaskGenerator,
    batched_mask_to_box,
    box_iou,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    generate_crop_boxes,
    mask_to_rle,
    nms,
    records_to_labels,
    rle_to_mask,
)
from napari_sam2.predictor.postprocess import remove_small_regions

RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}


# ========================================================================================== building blocks
def _iou_py(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float("nan")


def _nms_brute_force(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(not (_iou_py(boxes[i], boxes[k]) > thr) for k in keep):
            keep.append(i)
    return keep


def _random_boxes(rng, n: int) -> np.ndarray:
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    # near-duplicates, exact duplicates and a zero-area box
    boxes[n // 2 : n // 2 + 10] = boxes[:10] + rng.normal(0, 1.0, (10, 4)).clip(-2, 2)
    boxes[n - 5 : n] = boxes[5:10]
    boxes[3, 2:] = boxes[3, :2]
    return boxes.astype(np.float32)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 0.95, 1.0])
def test_nms_matches_brute_force(thr):
    rng = np.random.default_rng(int(thr * 100))
    for trial in range(4):
        boxes = _random_boxes(rng, 150)
        scores = rng.uniform(0, 1, len(boxes)).astype(np.float32)
        if trial == 1:
            scores = np.round(scores, 1)  # many ties: lower index wins
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
        assert keep.dtype == torch.int64
        assert keep.tolist() == _nms_brute_force(boxes.astype(np.float64), scores, thr)


def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert nms(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]])
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.8, 0.95]), 0.5).tolist() == [3, 2]
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.8, 0.95]), 1.0).tolist() == [3, 1, 2, 0]
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


def test_box_iou_matches_python():
    rng = np.random.default_rng(3)
    a, b = _random_boxes(rng, 20), _random_boxes(rng, 30)
    got = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = np.array([[_iou_py(x, y) for y in b.astype(np.float64)] for x in a.astype(np.float64)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_point_grid():
    g = build_point_grid(4)
    assert g.shape == (16, 2)
    side = np.array([1, 3, 5, 7]) / 8
    np.testing.assert_allclose(g[:4, 0], side)  # x varies fastest
    np.testing.assert_allclose(g[:4, 1], 1 / 8)
    np.testing.assert_allclose(g[::4, 1], side)
    assert len({tuple(p) for p in g}) == 16 and g.min() > 0 and g.max() < 1
    np.testing.assert_allclose(build_point_grid(1), [[0.5, 0.5]])
    grids = build_all_layer_point_grids(8, 2, 2)
    assert [len(x) for x in grids] == [64, 16, 4]
    assert [len(x) for x in build_all_layer_point_grids(8, 2, 1)] == [64, 64, 64]
    with pytest.raises(ValueError):
        build_point_grid(0)


def test_crop_boxes():
    boxes, layers = generate_crop_boxes((300, 400), 0, 512 / 1500)
    assert boxes == [[0, 0, 400, 300]] and layers == [0]
    boxes, layers = generate_crop_boxes((300, 400), 2, 512 / 1500)
    assert layers == [0] + [1] * 4 + [2] * 16
    covered = np.zeros((300, 400), int)
    for (x0, y0, x1, y1), layer in zip(boxes, layers):
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        if layer == 1:
            covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1 and covered.max() == 4  # layer 1 covers the image, with overlaps


def test_mask_to_box_and_rle():
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(6, 17, 23)) > 0.97
    masks[2] = False
    masks[3] = False
    masks[3, 16, 22] = True
    boxes = batched_mask_to_box(torch.from_numpy(masks))
    for m, b in zip(masks, boxes.tolist()):
        if not m.any():
            assert b == [0, 0, 0, 0]
            continue
        ys, xs = np.nonzero(m)
        assert b == [xs.min(), ys.min(), xs.max(), ys.max()]  # inclusive
        rle = mask_to_rle(m)
        assert rle["size"] == [17, 23] and sum(rle["counts"]) == m.size
        assert sum(rle["counts"][1::2]) == m.sum()
        np.testing.assert_array_equal(rle_to_mask(rle), m)
    assert batched_mask_to_box(torch.from_numpy(masks).reshape(2, 3, 17, 23)).shape == (2, 3, 4)
    full = np.ones((4, 5), bool)
    assert mask_to_rle(full)["counts"] == [0, 20]
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(full)), full)


def test_stability_score():
    logits = torch.full((2, 10, 10), -5.0)
    logits[0, 2:8, 2:8] = 5.0  # crisp: 1.0
    logits[1, 2:8, 2:8] = 0.5  # 36 px above -1, none above +1
    logits[1, 4:6, 4:6] = 2.0  # 4 px above +1
    s = calculate_stability_score(logits, 0.0, 1.0)
    np.testing.assert_allclose(s.numpy(), [1.0, 4 / 36])


def test_remove_small_regions():
    m = np.zeros((30, 30), bool)
    m[5:20, 5:20] = True
    m[10, 10] = False  # 1-px hole
    m[25, 25] = True  # 1-px island
    out, changed = remove_small_regions(m, 5, "holes")
    assert changed and out[10, 10] and out[25, 25]
    out, changed = remove_small_regions(out, 5, "islands")
    assert changed and not out[25, 25] and out[5:20, 5:20].all() and out.sum() == 225
    assert remove_small_regions(out, 5, "islands")[1] is False
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = tiny[5, 5] = tiny[5, 6] = True
    out, _ = remove_small_regions(tiny, 5, "islands")  # all small: the largest stays
    assert out.sum() == 2 and out[5, 5]


def test_constructor_errors():
    model = None  # never used: the errors come first
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(model, points_per_side=4, point_grids=[build_point_grid(2)])
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(model, output_mode="polygons")
    with pytest.raises(ValueError, match="max_area"):
        AutomaticMaskGenerator(model, min_area=100, max_area=10)
    with pytest.raises(ValueError, match="one per layer"):
        AutomaticMaskGenerator(model, points_per_side=None, point_grids=[build_point_grid(2)], crop_n_layers=1)


# ========================================================================================== real network
def _grey16(h=200, w=260) -> np.ndarray:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 2000 + rng.normal(0, 100, (h, w))
    img[(yy - 70) ** 2 + (xx - 80) ** 2 < 30**2] += 30000
    img[(yy - 130) ** 2 + (xx - 190) ** 2 < 35**2] += 20000
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def model(ref_tiny21):
    return build_model("sam2.1_hiera_tiny", checkpoint=ref_tiny21[1])


@pytest.fixture(scope="module")
def real_gen(model):
    """A generator on the real (random-weight) network; its embedding cache makes every generate()
    after the first skip the image encoder."""
    gen = AutomaticMaskGenerator(
        model, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    calls = []
    orig = gen.predictor._compute_features

    def counting(batch):
        calls.append(batch.shape[0])
        return orig(batch)

    gen.predictor._compute_features = counting
    gen.encoder_calls = calls

    # the filters are what these tests vary: run the decoder once per batch of clicks, then reuse it
    decoded = {}
    orig_decode = gen.predictor._decode

    def memo_decode(point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True, img_idx=0):
        assert boxes is None and mask_input is None
        key = (point_coords.cpu().numpy().tobytes(), point_labels.cpu().numpy().tobytes(), multimask_output)
        if key not in decoded:
            decoded[key] = orig_decode(point_coords, point_labels, None, None, multimask_output, img_idx)
        return tuple(t.clone() for t in decoded[key])

    gen.predictor._decode = memo_decode
    gen.decoded = decoded
    return gen


def _check_record(rec, h, w, full_crop=True):
    assert set(rec) == RECORD_KEYS
    seg = rec["segmentation"]
    assert isinstance(seg, np.ndarray) and seg.dtype == bool and seg.shape == (h, w)
    assert isinstance(rec["area"], int) and rec["area"] == int(seg.sum()) > 0
    ys, xs = np.nonzero(seg)
    assert rec["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
    assert all(isinstance(v, float) for v in rec["bbox"])
    assert isinstance(rec["predicted_iou"], float) and isinstance(rec["stability_score"], float)
    assert 0.0 <= rec["stability_score"] <= 1.0
    (pt,) = rec["point_coords"]
    assert len(pt) == 2 and all(isinstance(v, float) for v in pt)
    assert 0 <= pt[0] <= w and 0 <= pt[1] <= h
    if full_crop:
        assert rec["crop_box"] == [0.0, 0.0, float(w), float(h)]


def _settings(gen, **kw):
    base = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, min_area=0, max_area=None,
                output_mode="binary_mask")
    base.update(kw)
    for k, v in base.items():
        setattr(gen, k, v)


def test_real_network_records(real_gen):
    img = _grey16()
    h, w = img.shape
    _settings(real_gen, box_nms_thresh=0.7)
    recs = real_gen.generate(img)
    assert real_gen.encoder_calls == [1]
    assert 0 < len(recs) <= 16 * 3
    for rec in recs:
        _check_record(rec, h, w)
    # records of one crop come by decreasing predicted IoU (NMS order)
    ious = [r["predicted_iou"] for r in recs]
    assert ious == sorted(ious, reverse=True)
    # no two kept masks have box IoU above the NMS threshold
    boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                          for r in recs])
    iou = box_iou(boxes, boxes)
    iou.fill_diagonal_(0)
    assert not (iou > 0.7).any()
    # same image again, other settings: no new encoding; RLE output decodes to the same masks
    _settings(real_gen, box_nms_thresh=0.7, output_mode="uncompressed_rle")
    rle_recs = real_gen.generate(img)
    assert real_gen.encoder_calls == [1]
    assert len(rle_recs) == len(recs)
    for a, b in zip(recs, rle_recs):
        np.testing.assert_array_equal(rle_to_mask(b["segmentation"]), a["segmentation"])
        assert b["area"] == a["area"] and b["bbox"] == a["bbox"]
    labels = records_to_labels(recs, (h, w))
    assert labels.shape == (h, w) and labels.max() <= len(recs)


def test_real_network_filters_monotone(real_gen):
    img = _grey16()
    counts = {}
    # without NMS every filter is a plain subset: raising a threshold never adds masks
    for name, values in (
        ("pred_iou_thresh", [0.0, 0.3, 0.5, 0.7, 0.9]),
        ("stability_score_thresh", [0.0, 0.5, 0.8, 0.95]),
        ("min_area", [0, 500, 5000, 20000]),
    ):
        counts[name] = []
        for v in values:
            _settings(real_gen, **{name: v})
            recs = real_gen.generate(img)
            for r in recs:
                if name == "pred_iou_thresh":
                    assert r["predicted_iou"] > v or v == 0
                elif name == "stability_score_thresh":
                    assert r["stability_score"] >= v
                else:
                    assert r["area"] >= v
            counts[name].append(len(recs))
        assert counts[name] == sorted(counts[name], reverse=True), (name, counts[name])
    assert counts["pred_iou_thresh"][0] > 0
    _settings(real_gen)
    areas = sorted(r["area"] for r in real_gen.generate(img))
    _settings(real_gen, max_area=areas[len(areas) // 2])
    assert all(r["area"] <= areas[len(areas) // 2] for r in real_gen.generate(img))
    # with NMS, raising pred_iou_thresh still never adds masks (NMS visits masks by IoU)
    nms_counts = []
    for v in (0.0, 0.3, 0.6, 0.9):
        _settings(real_gen, pred_iou_thresh=v, box_nms_thresh=0.7)
        nms_counts.append(len(real_gen.generate(img)))
    assert nms_counts == sorted(nms_counts, reverse=True)
    assert real_gen.encoder_calls == [1]


def test_real_network_cleanup_options(real_gen):
    img = _grey16()
    _settings(real_gen)
    base = real_gen.generate(img)
    real_gen.min_region_area = 200
    try:
        cleaned = real_gen.generate(img)
    finally:
        real_gen.min_region_area = 0
    assert 0 < len(cleaned) <= len(base)
    for rec in cleaned:
        _check_record(rec, *img.shape)
        m = rec["segmentation"]
        assert not remove_small_regions(m, 200, "holes")[1] and not remove_small_regions(m, 200, "islands")[1]


# ========================================================================================== test double
class DiscOracle:
    """Stands in for the image encoder and mask decoder: a click inside a disc gets that disc
    (IoU 0.95), a slightly larger copy (0.90, a duplicate for NMS) and the whole image (0.97); a
    click outside the discs gets empty masks (IoU 0.99) and the whole image."""

    def __init__(self, discs, hw):
        self.discs = discs  # (cy, cx, r) in image pixels
        self.hw = hw
        self.crop = (0, 0, hw[1], hw[0])
        self.crops_seen = []

    def set_crop(self, gen, unit, crop_box):
        self.crop = tuple(crop_box)
        self.crops_seen.append(self.crop)
        x0, y0, x1, y1 = crop_box
        p = gen.predictor
        p.reset_predictor()
        p._features = {"image_embed": None, "high_res_feats": []}
        p._orig_hw = [(y1 - y0, x1 - x0)]
        p._is_image_set = True

    def _disc_logits(self, cy, cx, r):
        x0, y0, x1, y1 = self.crop
        j = (np.arange(256) + 0.5) * (x1 - x0) / 256 + x0
        i = (np.arange(256) + 0.5) * (y1 - y0) / 256 + y0
        d = np.sqrt((i[:, None] - cy) ** 2 + (j[None, :] - cx) ** 2)
        return np.clip(10.0 * (r - d), -20, 20)

    def decode(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True, img_idx=0):
        assert boxes is None and point_coords.ndim == 3 and point_coords.shape[1] == 1
        assert (point_labels == 1).all()
        x0, y0, x1, y1 = self.crop
        lows, ious = [], []
        for px, py in point_coords[:, 0].tolist():
            x, y = x0 + px / 1024 * (x1 - x0), y0 + py / 1024 * (y1 - y0)
            hit = [(cy, cx, r) for cy, cx, r in self.discs if (y - cy) ** 2 + (x - cx) ** 2 < r**2]
            full = np.full((256, 256), 20.0)
            if hit:
                cy, cx, r = hit[0]
                masks = [self._disc_logits(cy, cx, r), self._disc_logits(cy, cx, r + 3), full]
                iou = [0.95, 0.90, 0.97]
            else:
                masks = [np.full((256, 256), -20.0)] * 2 + [full]
                iou = [0.99, 0.99, 0.97]
            if not multimask_output:
                masks, iou = masks[:1], iou[:1]
            lows.append(np.stack(masks))
            ious.append(iou)
        return torch.tensor(np.stack(lows), dtype=torch.float32), torch.tensor(ious, dtype=torch.float32)


DISCS = [(60, 75, 28), (140, 190, 35)]
DH, DW = 200, 260


def _disc_generator(model, monkeypatch, **kw):
    params = dict(points_per_side=8, points_per_batch=5, pred_iou_thresh=0.8, stability_score_thresh=0.95)
    params.update(kw)
    gen = AutomaticMaskGenerator(model, **params)
    oracle = DiscOracle(DISCS, (DH, DW))
    monkeypatch.setattr(gen, "_set_crop", lambda unit, crop_box: oracle.set_crop(gen, unit, crop_box))
    monkeypatch.setattr(gen.predictor, "_decode", oracle.decode)
    return gen, oracle


def _gt_disc(cy, cx, r):
    yy, xx = np.mgrid[0:DH, 0:DW]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < r**2


def _assert_discs(recs):
    assert len(recs) == len(DISCS), [r["bbox"] for r in recs]
    found = set()
    for rec in recs:
        _check_record(rec, DH, DW, full_crop=False)
        seg = rec["segmentation"]
        k = max(range(len(DISCS)), key=lambda i: (seg & _gt_disc(*DISCS[i])).sum())
        found.add(k)
        cy, cx, r = DISCS[k]
        gt = _gt_disc(cy, cx, r)
        assert (seg & gt).sum() / (seg | gt).sum() > 0.95
        assert abs(rec["area"] - math.pi * r * r) / (math.pi * r * r) < 0.03
        assert rec["area"] == int(seg.sum())
        x, y, w, h = rec["bbox"]
        assert abs(x - (cx - r)) <= 1.5 and abs(y - (cy - r)) <= 1.5
        assert abs(w - (2 * r - 1)) <= 2 and abs(h - (2 * r - 1)) <= 2
        assert rec["predicted_iou"] == pytest.approx(0.95)
        assert rec["stability_score"] > 0.95
        (px, py), = rec["point_coords"]
        assert (py - cy) ** 2 + (px - cx) ** 2 < r**2
    assert found == set(range(len(DISCS)))


def test_two_discs_once_each(model, monkeypatch):
    img = np.zeros((DH, DW), np.uint16)
    gen, oracle = _disc_generator(model, monkeypatch, max_area=DH * DW // 2)
    recs = gen.generate(img)
    assert oracle.crops_seen == [(0, 0, DW, DH)]
    _assert_discs(recs)
    # without max_area the whole-image mask (highest IoU) stays; it does not suppress the discs
    gen.max_area = None
    recs = gen.generate(img)
    assert len(recs) == 3 and recs[0]["area"] == DH * DW and recs[0]["predicted_iou"] == pytest.approx(0.97)
    _assert_discs(recs[1:])
    # min_area above the discs' area leaves only the whole image
    gen.min_area = 5000
    assert [r["area"] for r in gen.generate(img)] == [DH * DW]
    # box NMS off: each disc comes from every grid click inside it, plus the enlarged copies
    gen.min_area, gen.max_area, gen.box_nms_thresh = 0, DH * DW // 2, 1.0
    assert len(gen.generate(img)) > 2 * len(DISCS)
    # stricter IoU filter removes the discs (0.95)
    gen.box_nms_thresh, gen.pred_iou_thresh = 0.7, 0.96
    assert gen.generate(img) == []


def test_two_discs_with_crops_and_m2m(model, monkeypatch):
    img = np.zeros((DH, DW, 3), np.uint8)
    gen, oracle = _disc_generator(model, monkeypatch, max_area=DH * DW // 2, crop_n_layers=1, use_m2m=True)
    recs = gen.generate(img)
    assert len(oracle.crops_seen) == 5
    _assert_discs(recs)
    for rec in recs:  # crop boxes are XYWH inside the image
        x, y, w, h = rec["crop_box"]
        assert 0 <= x and 0 <= y and x + w <= DW and y + h <= DH


def test_generate_rejects_bad_images(model):
    gen = AutomaticMaskGenerator(model, points_per_side=2)
    with pytest.raises(ValueError, match="H x W"):
        gen.generate(np.zeros((2, 3, 10, 10), np.uint8))
    bad = np.zeros((10, 10), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gen.generate(bad)
