"""ImagePredictor: parity with the official image predictor's steps, run with the reference model's
modules, and behaviour on microscopy-like (16-bit grey) images.

The official ``SAM2ImagePredictor`` imports torchvision, which is not available here, so the test
re-does its steps with the reference *model* (sam2==1.1.0): ``ToTensor`` + ``Resize`` (antialiased
bilinear on a float tensor) + ``Normalize``, ``forward_image``, ``_prepare_backbone_features``,
``no_mem_embed``, ``sam_prompt_encoder`` (box corners as points labelled 2/3 before the clicks),
``sam_mask_decoder`` and bilinear upsampling to the original size.

The image encoder costs seconds on a CPU: each image is encoded once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sam2 import build_model
from napari_sam2.predictor.image import ImageNotSetError, ImagePredictor
from napari_sam2.predictor.postprocess import fill_holes_and_sprinkles
from napari_sam2.predictor.preprocess import to_model_input, to_unit_rgb

H, W = 300, 400  # non-square on purpose
LOGIT_TOL = 1e-4


# ------------------------------------------------------------------------------------------ data
def _rgb_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 3), dtype=np.float64)
    img[..., 0] = 40 + 0.3 * xx
    img[..., 1] = 60 + 0.4 * yy
    img[..., 2] = 90
    disc = (yy - 120) ** 2 + (xx - 150) ** 2 < 50**2
    img[disc] = (220, 180, 60)
    square = (np.abs(yy - 200) < 40) & (np.abs(xx - 300) < 50)
    img[square] = (30, 200, 220)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _grey16_image() -> np.ndarray:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:H, 0:W]
    img = 1000 + rng.normal(0, 50, (H, W))
    for cy, cx, r in ((100, 120, 35), (200, 280, 45)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] += 20000
    img[5, 7] = 65535  # a hot pixel: percentile normalisation must ignore it
    return np.clip(img, 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------------------------------ the reference's steps
def _ref_preprocess(img: np.ndarray, size: int) -> torch.Tensor:
    """torchvision ToTensor -> Resize((size, size)) (antialias=True on float tensors) -> Normalize."""
    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).to(torch.float32).div(255)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


@torch.no_grad()
def _ref_features(ref, x: torch.Tensor) -> list[torch.Tensor]:
    out = ref.forward_image(x)
    _, vision_feats, _, feat_sizes = ref._prepare_backbone_features(out)
    vision_feats[-1] = vision_feats[-1] + ref.no_mem_embed
    b = x.shape[0]
    return [
        f.permute(1, 2, 0).view(b, -1, *s) for f, s in zip(vision_feats[::-1], feat_sizes[::-1])
    ][::-1]


@torch.no_grad()
def _ref_predict(ref, feats, orig_hw, coords=None, labels=None, box=None, mask_input=None, multimask=True):
    h, w = orig_hw
    size = ref.image_size

    def to_input(c):
        c = c.clone()
        c[..., 0] = c[..., 0] / w
        c[..., 1] = c[..., 1] / h
        return c * size

    points = None
    if coords is not None:
        c = to_input(torch.as_tensor(coords, dtype=torch.float))
        lab = torch.as_tensor(labels, dtype=torch.int)
        if c.ndim == 2:
            c, lab = c[None], lab[None]
        points = (c, lab)
    if box is not None:
        b = to_input(torch.as_tensor(box, dtype=torch.float).reshape(-1, 2, 2))
        bl = torch.tensor([[2, 3]], dtype=torch.int).repeat(b.shape[0], 1)
        points = (b, bl) if points is None else (torch.cat([b, points[0]], 1), torch.cat([bl, points[1]], 1))
    mask = None
    if mask_input is not None:
        mask = torch.as_tensor(mask_input, dtype=torch.float)
        if mask.ndim == 3:
            mask = mask[None]
    sparse, dense = ref.sam_prompt_encoder(points=points, boxes=None, masks=mask)
    low, iou, _, _ = ref.sam_mask_decoder(
        image_embeddings=feats[-1],
        image_pe=ref.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=points is not None and points[0].shape[0] > 1,
        high_res_features=feats[:-1],
    )
    masks = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)
    return masks.squeeze(0).numpy(), iou.squeeze(0).numpy(), low.clamp(-32, 32).squeeze(0).numpy()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model(ref_tiny21):
    _, ckpt = ref_tiny21
    return build_model("sam2.1_hiera_tiny", checkpoint=ckpt)


@pytest.fixture(scope="module")
def rgb():
    return _rgb_image()


@pytest.fixture(scope="module")
def grey16():
    return _grey16_image()


@pytest.fixture(scope="module")
def rgb_predictor(model, rgb):
    p = ImagePredictor(model)
    p.set_image(rgb)
    return p


@pytest.fixture(scope="module")
def ref_feats(ref_tiny21, rgb):
    ref, _ = ref_tiny21
    return _ref_features(ref, _ref_preprocess(rgb, ref.image_size))


@pytest.fixture(scope="module")
def grey_predictor(model, grey16):
    p = ImagePredictor(model)
    p.set_image(grey16)
    return p


# ------------------------------------------------------------------------------------------ parity
def test_preprocessing_matches_reference(rgb):
    ours = to_model_input(to_unit_rgb(rgb), 1024)
    ref = _ref_preprocess(rgb, 1024)
    assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_features_match_reference(rgb_predictor, ref_feats):
    ours = rgb_predictor._features
    assert torch.allclose(ours["image_embed"], ref_feats[-1], atol=1e-5, rtol=0)
    for a, b in zip(ours["high_res_feats"], ref_feats[:-1]):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    emb = rgb_predictor.get_image_embedding()
    assert tuple(emb.shape) == (1, 256, 64, 64)


PROMPTS = {
    "click": (dict(coords=[[150.0, 120.0]], labels=[1]), True),
    "clicks_and_negative": (dict(coords=[[150.0, 120.0], [160.5, 110.25], [300.0, 200.0]], labels=[1, 1, 0]), False),
    "box": (dict(box=[95.0, 65.0, 210.0, 175.0]), False),
    "box_multimask": (dict(box=[95.0, 65.0, 210.0, 175.0]), True),
    "box_and_click": (dict(box=[245.0, 155.0, 355.0, 245.0], coords=[[300.0, 200.0]], labels=[1]), True),
    "image_corners": (dict(coords=[[0.0, 0.0], [400.0, 300.0]], labels=[1, 0]), False),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_predict_parity(rgb_predictor, ref_feats, ref_tiny21, name):
    ref, _ = ref_tiny21
    p, multimask = PROMPTS[name]
    ours = rgb_predictor.predict(
        point_coords=p.get("coords"), point_labels=p.get("labels"), box=p.get("box"),
        multimask_output=multimask, return_logits=True,
    )
    theirs = _ref_predict(ref, ref_feats, (H, W), p.get("coords"), p.get("labels"), p.get("box"), multimask=multimask)
    n = 3 if multimask else 1
    assert ours[0].shape == (n, H, W) and ours[1].shape == (n,) and ours[2].shape == (n, 256, 256)
    assert ours[0].dtype == np.float32
    assert np.abs(ours[0] - theirs[0]).max() <= LOGIT_TOL
    assert np.abs(ours[2] - theirs[2]).max() <= LOGIT_TOL
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-6)
    if name == "click":  # boolean masks are the thresholded logits
        masks, _, _ = rgb_predictor.predict(point_coords=p["coords"], point_labels=p["labels"])
        assert masks.dtype == bool and np.array_equal(masks, ours[0] > 0.0)


def test_mask_input_parity(rgb_predictor, ref_feats, ref_tiny21):
    ref, _ = ref_tiny21
    _, scores, low = rgb_predictor.predict(point_coords=[[150, 120]], point_labels=[1])
    prev = low[np.argmax(scores)][None]  # 1 x 256 x 256
    kw = dict(coords=[[150.0, 120.0], [170.0, 140.0]], labels=[1, 1])
    ours = rgb_predictor.predict(
        point_coords=kw["coords"], point_labels=kw["labels"], mask_input=prev, multimask_output=False, return_logits=True
    )
    theirs = _ref_predict(ref, ref_feats, (H, W), kw["coords"], kw["labels"], mask_input=prev, multimask=False)
    assert np.abs(ours[0] - theirs[0]).max() <= LOGIT_TOL
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-6)
    # the mask really is used
    without = rgb_predictor.predict(point_coords=kw["coords"], point_labels=kw["labels"], multimask_output=False,
                                    return_logits=True)
    assert np.abs(without[0] - ours[0]).max() > 1e-3


def test_batched_boxes_parity(rgb_predictor, ref_feats, ref_tiny21):
    ref, _ = ref_tiny21
    boxes = np.array([[95, 65, 210, 175], [245, 155, 355, 245]], dtype=np.float64)
    ours = rgb_predictor.predict(box=boxes, multimask_output=False, return_logits=True)
    theirs = _ref_predict(ref, ref_feats, (H, W), box=boxes, multimask=False)
    assert ours[0].shape == (2, 1, H, W) and ours[1].shape == (2, 1) and ours[2].shape == (2, 1, 256, 256)
    assert np.abs(ours[0] - theirs[0]).max() <= LOGIT_TOL
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-6)
    # each row equals the single-box prediction
    single = rgb_predictor.predict(box=boxes[1], multimask_output=False, return_logits=True)
    assert np.abs(single[0] - ours[0][1]).max() <= LOGIT_TOL
    # batched boxes, each with its own clicks (a positive and a negative one)
    clicks = np.array([[[150, 120], [20, 20]], [[300, 200], [390, 290]]], dtype=np.float64)
    labels = np.array([[1, 0], [1, 0]])
    ours = rgb_predictor.predict(point_coords=clicks, point_labels=labels, box=boxes, return_logits=True)
    theirs = _ref_predict(ref, ref_feats, (H, W), clicks, labels, boxes)
    assert ours[0].shape == (2, 3, H, W)
    assert np.abs(ours[0] - theirs[0]).max() <= LOGIT_TOL
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-6)


def test_hole_and_sprinkle_removal(model, rgb_predictor):
    p = ImagePredictor(model, max_hole_area=50, max_sprinkle_area=50)
    p._features, p._orig_hw, p._is_image_set = rgb_predictor._features, rgb_predictor._orig_hw, True
    raw = rgb_predictor.predict(point_coords=[[150, 120]], point_labels=[1], return_logits=True)
    cleaned = p.predict(point_coords=[[150, 120]], point_labels=[1], return_logits=True)
    np.testing.assert_array_equal(raw[1], cleaned[1])
    np.testing.assert_array_equal(raw[2], cleaned[2])  # low-res output is not post-processed
    # the official post-processing, with the reference oracle's CPU stand-in for the CUDA kernel
    from reference import cpu_get_connected_components

    low = torch.from_numpy(raw[2]).clone()[None]
    flat = low.flatten(0, 1).unsqueeze(1)
    labels, areas = cpu_get_connected_components(flat <= 0.0)
    expected = torch.where(((labels > 0) & (areas <= 50)).reshape_as(low), 10.0, low)
    labels, areas = cpu_get_connected_components(flat > 0.0)
    expected = torch.where(((labels > 0) & (areas <= 50)).reshape_as(low), -10.0, expected)
    assert torch.equal(expected, fill_holes_and_sprinkles(low, 0.0, 50, 50))
    expected = F.interpolate(expected, (H, W), mode="bilinear", align_corners=False)[0].numpy()
    assert np.abs(raw[2]).max() < 32  # so the clamped low-res output is the raw decoder output
    assert np.abs(cleaned[0] - expected).max() <= LOGIT_TOL


def test_fill_holes_and_sprinkles_semantics():
    logits = -torch.ones(1, 1, 20, 20)
    logits[0, 0, 2:12, 2:12] = 1.0
    logits[0, 0, 5:7, 5:7] = -1.0  # a 4-pixel hole
    logits[0, 0, 16, 16] = 2.0  # a 1-pixel sprinkle
    out = fill_holes_and_sprinkles(logits, 0.0, max_hole_area=4, max_sprinkle_area=1)
    assert (out[0, 0, 5:7, 5:7] == 10.0).all()
    assert out[0, 0, 16, 16] == -10.0
    assert torch.equal(out[0, 0, 2:5, 2:12], logits[0, 0, 2:5, 2:12])
    # areas at the limit only: a 4-pixel hole stays with max_hole_area=3
    out = fill_holes_and_sprinkles(logits, 0.0, max_hole_area=3, max_sprinkle_area=0)
    assert (out[0, 0, 5:7, 5:7] == -1.0).all() and out[0, 0, 16, 16] == 2.0


# ------------------------------------------------------------------------------------------ 16-bit grey behaviour
def test_unit_rgb_percentile_normalisation(grey16):
    unit = to_unit_rgb(grey16)
    assert unit.shape == (H, W, 3) and unit.dtype == np.float32
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert np.array_equal(unit[..., 0], unit[..., 1]) and np.array_equal(unit[..., 0], unit[..., 2])
    lo, hi = np.percentile(grey16, [0.5, 99.5])
    np.testing.assert_allclose(unit[..., 0], np.clip((grey16 - lo) / (hi - lo), 0, 1), atol=1e-6)
    # the hot pixel does not set the range: the discs are bright, not squashed towards 0
    assert unit[100, 120, 0] > 0.9
    # the same data as float or scaled by a constant normalises (almost) the same way
    np.testing.assert_allclose(to_unit_rgb(grey16.astype(np.float32)), unit, atol=1e-6)
    np.testing.assert_allclose(to_unit_rgb(grey16.astype(np.float64) * 1e-3), unit, atol=1e-5)
    # a fixed range
    fixed = to_unit_rgb(grey16, intensity_range=(1000, 21000))
    np.testing.assert_allclose(fixed[..., 0], np.clip((grey16 - 1000.0) / 20000.0, 0, 1), atol=1e-6)
    # uint8 grey is /255, replicated
    g8 = (np.arange(H * W) % 256).reshape(H, W).astype(np.uint8)
    np.testing.assert_array_equal(to_unit_rgb(g8), np.repeat((g8.astype(np.float32) / 255)[..., None], 3, -1))
    # constant image: no division by zero
    assert np.all(to_unit_rgb(np.full((10, 10), 7, np.uint16)) == 0)


def test_grey16_predict_shapes(grey_predictor):
    p = grey_predictor
    assert p.orig_hw == [(H, W)]
    masks, scores, low = p.predict(point_coords=np.array([[120, 100]]), point_labels=np.array([1]))
    assert masks.shape == (3, H, W) and masks.dtype == bool
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    assert low.shape == (3, 256, 256) and low.dtype == np.float32 and np.abs(low).max() <= 32
    masks, scores, low = p.predict(box=[85, 65, 155, 135], multimask_output=False)
    assert masks.shape == (1, H, W) and scores.shape == (1,) and low.shape == (1, 256, 256)
    # normalised coordinates give the same answer as pixels
    a = p.predict(point_coords=[[120, 100]], point_labels=[1], return_logits=True)
    b = p.predict(point_coords=[[120 / W, 100 / H]], point_labels=[1], normalize_coords=False, return_logits=True)
    assert np.abs(a[0] - b[0]).max() < 1e-4
    # a mask prompt alone works (as in the official predictor)
    m, s, _ = p.predict(mask_input=low, multimask_output=False)
    assert m.shape == (1, H, W)


def test_grey16_differs_from_rgb(grey_predictor, rgb_predictor):
    assert not torch.allclose(grey_predictor.get_image_embedding(), rgb_predictor.get_image_embedding())


def test_set_image_batch(model, rgb, grey16, rgb_predictor, grey_predictor):
    """Batch bookkeeping (per-image normalisation, sizes, img_idx); the encoder itself is stubbed
    with the single-image features computed above (encoding a batch of 2 would cost ~10 s)."""
    p = ImagePredictor(model)

    seen = []

    def stub(batch):
        seen.append(batch)
        g, r = grey_predictor._features, rgb_predictor._features
        return {
            "image_embed": torch.cat([g["image_embed"], r["image_embed"]]),
            "high_res_feats": [torch.cat([a, b]) for a, b in zip(g["high_res_feats"], r["high_res_feats"])],
        }

    p._compute_features = stub
    small = rgb[:100, :150]
    p.set_image_batch([grey16, rgb])
    assert seen[0].shape == (2, 3, 1024, 1024)
    assert torch.equal(seen[0][0:1], to_model_input(to_unit_rgb(grey16), 1024))  # each image normalised alone
    assert torch.equal(seen[0][1:2], to_model_input(to_unit_rgb(rgb), 1024))
    assert p.get_image_embedding().shape == (2, 256, 64, 64) and p.orig_hw == [(H, W), (H, W)]
    with pytest.raises(RuntimeError, match="predict_batch"):
        p.predict(point_coords=[[10, 10]], point_labels=[1])
    masks, ious, lows = p.predict_batch(
        point_coords_batch=[[[120, 100]], [[150, 120]]], point_labels_batch=[[1], [1]], return_logits=True
    )
    assert len(masks) == len(ious) == len(lows) == 2 and masks[0].shape == (3, H, W)
    g = grey_predictor.predict(point_coords=[[120, 100]], point_labels=[1], return_logits=True)
    r = rgb_predictor.predict(point_coords=[[150, 120]], point_labels=[1], return_logits=True)
    for ours, single in ((masks[0], g[0]), (masks[1], r[0]), (ious[0], g[1]), (ious[1], r[1]), (lows[1], r[2])):
        np.testing.assert_array_equal(ours, single)
    with pytest.raises(ValueError, match="2 images"):
        p.predict_batch(box_batch=[[10, 10, 50, 60]])
    # each image keeps its own size
    p.set_image_batch([grey16, small])
    assert p.orig_hw == [(H, W), (100, 150)]
    with pytest.raises(ValueError, match="inside the 150 x 100 image"):
        p.predict_batch(point_coords_batch=[[[10, 10]], [[200, 10]]], point_labels_batch=[[1], [1]])
    masks, _, _ = p.predict_batch(box_batch=[None, [10, 10, 50, 60]], multimask_output=False)
    assert masks[0].shape == (1, H, W) and masks[1].shape == (1, 100, 150) and masks[1].dtype == bool


# ------------------------------------------------------------------------------------------ bad input
def test_predict_before_set_image(model):
    p = ImagePredictor(model)
    with pytest.raises(ImageNotSetError, match="set_image"):
        p.predict(point_coords=[[1, 1]], point_labels=[1])
    with pytest.raises(RuntimeError):  # the official predictor's exception type
        p.get_image_embedding()
    with pytest.raises(ValueError):
        p.predict(box=[0, 0, 5, 5])


def test_reset_predictor(model, rgb_predictor):
    p = ImagePredictor(model)
    p._features, p._orig_hw, p._is_image_set = rgb_predictor._features, rgb_predictor._orig_hw, True
    p.predict(point_coords=[[1, 1]], point_labels=[1])
    p.reset_predictor()
    assert not p.is_image_set and p.orig_hw is None
    with pytest.raises(ImageNotSetError):
        p.predict(point_coords=[[1, 1]], point_labels=[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(point_coords=[[10, 10]]), "point_labels must be supplied"),
        (dict(point_labels=[1]), "without point_coords"),
        (dict(point_coords=[[10, 10], [20, 20]], point_labels=[1]), r"one label per point.*\(2,\)"),
        (dict(point_coords=[10, 10], point_labels=[1]), "N x 2"),
        (dict(point_coords=[[10, 10, 3]], point_labels=[1]), "N x 2"),
        (dict(point_coords=[[401, 10]], point_labels=[1]), r"inside the 400 x 300 image"),
        (dict(point_coords=[[10, -1]], point_labels=[1]), r"0 <= y <= 300"),
        (dict(point_coords=[[10, 10]], point_labels=[5]), "point_labels must be 1"),
        (dict(point_coords=[[np.nan, 10]], point_labels=[1]), "NaN"),
        (dict(point_coords=[[100, 100]], point_labels=[1], normalize_coords=False), r"in \[0, 1\]"),
        (dict(box=[10, 10, 20]), "x0, y0, x1, y1"),
        (dict(box=[50, 10, 20, 40]), "x0 <= x1"),
        (dict(box=[10, 10, 500, 40]), "inside the 400 x 300 image"),
        (dict(box=np.zeros((2, 4)), point_coords=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1))), "3 sets of clicks"),
        (dict(point_coords=[[10, 10]], point_labels=[1], mask_input=np.zeros((1, 64, 64))), "256 x 256"),
        (dict(box=np.zeros((2, 4)), mask_input=np.zeros((3, 1, 256, 256))), "3 masks"),
    ],
)
def test_bad_prompts(rgb_predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rgb_predictor.predict(**kwargs)


def test_bad_images(model):
    p = ImagePredictor(model)
    with pytest.raises(ValueError, match="H x W"):
        p.set_image(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="H x W"):
        p.set_image(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        p.set_image(np.zeros((3, 10, 10, 2), np.uint8)[0])
    bad = np.ones((10, 10), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        p.set_image(bad)
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        p.set_image(bad)
    with pytest.raises(ValueError, match="empty"):
        p.set_image(np.zeros((0, 10), np.uint8))
    with pytest.raises(TypeError):
        p.set_image(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="list"):
        p.set_image_batch(np.zeros((2, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="intensity_range"):
        p.set_image(np.zeros((10, 10), np.uint16), intensity_range=(5, 1))
    assert not p.is_image_set
