"""What a user of :class:`napari_sam2.VideoPredictor` relies on.

Inputs of every kind, masks at the video's resolution in ``obj_ids`` order, propagation order, lazy
reading of frames, per-stack normalisation, object scores, post-processing (non-overlap, hole
filling), corrections, prompt management and clear errors for bad input.

The network has random weights (plus seeded noise, and +2 on the object-score head so that objects
are "present": with plain random weights every mask would be the -1024 "absent" mask) and a small
input (128 x 128): what is tested is the predictor's bookkeeping, not segmentation quality. Parity
with the reference implementation is tested in ``test_video_parity.py``.
"""

from __future__ import annotations

from collections import Counter

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
from models import random_model

from napari_sam2.build import resolve_device
from napari_sam2.predictor import VideoPredictor, build_video_predictor
from napari_sam2.predictor.frames import FrameSource
from napari_sam2.predictor.postprocess import fill_holes, non_overlapping
from napari_sam2.synthetic import make_timelapse

NAME = "sam2.1_hiera_tiny"
SIZE = 128  # network input: every module adapts to it, and a step costs a fraction of 1024's
NO_OBJ = -1024.0


class CountingArray:
    """A numpy array behind an array-like that counts how often each frame (axis 0) is read."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.reads: Counter = Counter()

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        for t in np.atleast_1d(np.arange(self.shape[0])[first]):
            self.reads[int(t)] += 1
        return self.array[key]


@pytest.fixture(scope="module")
def model():
    return random_model(SIZE, seed=0, name=NAME)


@pytest.fixture(scope="module")
def predictor(model):
    return VideoPredictor(model)


@pytest.fixture(scope="module")
def cells():
    """8 frames of 64 x 80 (H x W, not square) uint16 with 3 cells that do not divide."""
    return make_timelapse(n_frames=8, shape=(64, 80), n_cells=3, divide=False, enter=False, seed=1)


def centres(ts, t: int = 0) -> list[tuple[int, float, float]]:
    """(label, x, y) of a click on every cell on frame t, in the predictor's x, y order."""
    return [(int(r.obj_id), float(r.x), float(r.y)) for r in ts.clicks(t).itertuples()]


def click(predictor, state, t, obj_id, x, y, **kw):
    return predictor.add_new_points_or_box(state, t, obj_id, points=[[x, y]], labels=[1], **kw)


def frames_of(gen) -> list[int]:
    return [t for t, _, _ in gen]


# ------------------------------------------------------------------------------------------ inputs


def _source(kind: str, image: np.ndarray, tmp_path):
    """The same (T, Y, X) video in another container; returns (video, init_state kwargs)."""
    if kind == "numpy":
        return image, {}
    if kind == "dask":
        return da.from_array(image, chunks=(2, -1, -1)), {}
    if kind == "zarr":
        zarr = pytest.importorskip("zarr")

        z = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=image.shape, chunks=(1,) + image.shape[1:], dtype=image.dtype)
        z[:] = image
        return z, {}
    if kind == "tiff":
        tifffile.imwrite(tmp_path / "v.tif", image)
        return str(tmp_path / "v.tif"), {}
    if kind == "folder":
        folder = tmp_path / "frames"
        folder.mkdir()
        for t, frame in enumerate(image):
            tifffile.imwrite(folder / f"t{t:03d}.tif", frame)
        return folder, {}
    if kind == "axes_yxt":
        return np.ascontiguousarray(image.transpose(1, 2, 0)), {"axes": "YXT"}
    if kind == "channel":
        other = np.full_like(image, 7)
        return np.stack([other, image], axis=1), {"channel": 1, "axes": "TCYX"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr", "tiff", "folder", "axes_yxt", "channel"])
def test_every_container_gives_the_same_frames(predictor, cells, kind, tmp_path):
    video, kw = _source(kind, cells.image, tmp_path)
    state = predictor.init_state(video, **kw)
    T, H, W = cells.image.shape
    assert (state.num_frames, state.video_height, state.video_width) == (T, H, W)
    assert (state["num_frames"], state["video_height"], state["video_width"]) == (T, H, W)
    expected = FrameSource(cells.image, SIZE)
    assert state.frames.range == expected.range
    for t in (0, 3, T - 1):
        x = state.frames[t]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.equal(x, expected[t]), f"{kind}: frame {t} differs from the numpy video's"
    predictor.close(state)


def test_float32_video_gives_the_same_frames_as_uint16(predictor, cells):
    ours = predictor.init_state(cells.image.astype(np.float32))
    expected = FrameSource(cells.image, SIZE)
    np.testing.assert_allclose(ours.frames.range, expected.range, rtol=1e-6)
    torch.testing.assert_close(ours.frames[2], expected[2], atol=1e-5, rtol=0)


def test_rgb_uint8_video(predictor, cells):
    img = (cells.image / cells.image.max() * 255).astype(np.uint8)
    rgb = np.stack([img, img // 2, 255 - img], axis=-1)  # (T, Y, X, 3)
    state = predictor.init_state(rgb)
    T, H, W = img.shape
    assert (state.num_frames, state.video_height, state.video_width) == (T, H, W)
    x = state.frames[0]
    assert x.shape == (3, SIZE, SIZE)
    assert not torch.equal(x[0], x[2]), "the colour channels must stay apart"
    (label, cx, cy) = centres(cells)[0]
    t, ids, masks = click(predictor, state, 0, label, cx, cy)
    assert (t, ids) == (0, [label])
    assert masks.shape == (1, 1, H, W)
    # official 8-bit preprocessing is available for RGB
    ref_state = predictor.init_state(rgb, normalize="reference")
    assert ref_state.frames[0].shape == (3, SIZE, SIZE)
    predictor.close(state)


def test_masks_come_at_video_resolution_one_per_object_in_obj_ids_order(predictor, cells):
    T, H, W = cells.image.shape
    state = predictor.init_state(cells.image)
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    t, ids, masks = predictor.add_new_mask(state, 0, 5, left)
    assert (t, ids, masks.shape) == (0, [5], (1, 1, H, W))
    t, ids, masks = predictor.add_new_mask(state, 0, 2, ~left)
    assert ids == [5, 2] and masks.shape == (2, 1, H, W)
    # a mask prompt is its own output: object 5 on the left, object 2 on the right
    assert (masks[0, 0, :, : W // 2 - 2] > 0).all() and (masks[0, 0, :, W // 2 + 2 :] < 0).all()
    assert (masks[1, 0, :, W // 2 + 2 :] > 0).all() and (masks[1, 0, :, : W // 2 - 2] < 0).all()
    # a third object prompted on a later frame only: on frame 1 the others have no output yet
    label, x, y = centres(cells, 1)[0]
    t, ids, masks = click(predictor, state, 1, 9, x, y)
    assert (t, ids, masks.shape) == (1, [5, 2, 9], (3, 1, H, W))
    assert (masks[:2] == NO_OBJ).all()
    # propagation starts on frame 0, where object 9 is tracked towards its prompt that lies ahead
    out = list(predictor.propagate_in_video(state, max_frame_num_to_track=2))
    assert frames_of(out) == [0, 1, 2]
    for _t, ids, masks in out:
        assert ids == [5, 2, 9]
        assert masks.shape == (3, 1, H, W) and masks.dtype == torch.float32
        assert torch.isfinite(masks).all()
    m0 = out[0][2]
    assert (m0[0, 0, :, : W // 2 - 2] > 0).all() and (m0[1, 0, :, W // 2 + 2 :] > 0).all()
    predictor.close(state)


def test_propagation_order_forward_reverse_start_and_max(predictor, cells):
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells, 2)[0]
    click(predictor, state, 2, label, x, y)
    # default: from the earliest prompted frame to the end
    assert frames_of(predictor.propagate_in_video(state)) == [2, 3, 4, 5, 6, 7]
    assert frames_of(predictor.propagate_in_video(state, reverse=True)) == [2, 1, 0]
    assert frames_of(predictor.propagate_in_video(state, start_frame_idx=3, max_frame_num_to_track=2)) == [3, 4, 5]
    assert frames_of(predictor.propagate_in_video(state, start_frame_idx=6, max_frame_num_to_track=5)) == [6, 7]
    assert frames_of(predictor.propagate_in_video(state, start_frame_idx=6, max_frame_num_to_track=2, reverse=True)) == [6, 5, 4]
    assert frames_of(predictor.propagate_in_video(state, start_frame_idx=0, reverse=True)) == []  # as the official
    predictor.close(state)


# ------------------------------------------------------------------------------------ lazy frames


def test_init_state_reads_only_a_sample_and_propagation_reads_each_frame_once(predictor):
    ts = make_timelapse(n_frames=20, shape=(48, 48), n_cells=1, divide=False, enter=False, seed=3)
    video = CountingArray(ts.image)
    state = predictor.init_state(video)
    assert 0 < len(video.reads) <= 16 < ts.n_frames, f"init_state read frames {sorted(video.reads)}"
    assert max(video.reads.values()) == 1
    video.reads.clear()
    label, x, y = centres(ts)[0]
    click(predictor, state, 0, label, x, y)
    assert dict(video.reads) == {0: 1}
    frames = []
    for t, _, _ in predictor.propagate_in_video(state):
        frames.append(t)
        # frames are read as they are needed: the next one is prepared while this one is tracked
        assert t <= max(video.reads) <= t + 1
    assert frames == list(range(ts.n_frames))
    # the feature cache: frame 0 was encoded for the click and not read again; each frame once
    assert dict(video.reads) == {t: 1 for t in range(ts.n_frames)}
    predictor.close(state)


@pytest.mark.parametrize("normalize", ["reference", (0.0, 255.0)])
def test_fixed_normalisation_reads_nothing_at_init(predictor, normalize):
    video = CountingArray(np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3)).astype(np.uint8))
    predictor.init_state(video, normalize=normalize)
    assert not video.reads


# ---------------------------------------------------------------------------------- normalisation


def test_same_frame_twice_gives_identical_network_inputs(cells):
    video = cells.image.copy()
    video[5] = video[1]
    frames = FrameSource(video, SIZE)
    assert torch.equal(frames[1], frames[5])


def test_range_is_per_stack_not_per_frame(cells):
    """A dimmer copy of a frame stays dimmer (per-frame scaling would make it look the same)."""
    video = cells.image.copy()
    video[4] = video[1] // 2
    frames = FrameSource(video, SIZE)
    # intensities after the ImageNet scaling: 1 / 0.229 per unit of the [0, 1] range
    assert frames[4].amax() < frames[1].amax() - 1.0
    lo, hi = frames.range
    assert lo >= video.min() and hi <= video.max() and hi > lo


def test_scaled_video_gives_the_same_inputs_and_features(predictor, cells):
    """A uint16 video and the same video x 16 (another camera gain) are the same to the network."""
    base = cells.image
    scaled = base.astype(np.uint32) * 16
    a, b = predictor.init_state(base), predictor.init_state(scaled)
    assert b.frames.range == pytest.approx(tuple(16 * v for v in a.frames.range), rel=1e-9)
    for t in (0, 4):
        assert torch.equal(a.frames[t], b.frames[t])
    fa, fb = a.features(0), b.features(0)
    assert torch.equal(fa.embed, fb.embed) and torch.equal(fa.high_res[0], fb.high_res[0])


def test_rgb_percentiles_see_the_whole_frame():
    img = np.full((4, 64, 64), 10, np.uint8)
    img[:, 5:8, 10:60] = 200  # a bright band, 3.7 % of the pixels, between the sampled rows
    rgb = np.repeat(img[..., None], 3, axis=-1)
    assert FrameSource(img, SIZE).range == (10.0, 200.0)
    assert FrameSource(rgb, SIZE).range == (10.0, 200.0)


# ------------------------------------------------------------------------------------ object scores


def test_object_score_logits_finite_on_tracked_frames_nan_elsewhere(predictor, cells):
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells, 3)[0]
    click(predictor, state, 3, label, x, y)
    s = state.object_score_logits(label)
    assert s.shape == (cells.n_frames,)
    assert np.isfinite(s[3]) and np.isnan(np.delete(s, 3)).all()
    list(predictor.propagate_in_video(state, start_frame_idx=3, max_frame_num_to_track=2))
    list(predictor.propagate_in_video(state, start_frame_idx=3, max_frame_num_to_track=1, reverse=True))
    s = state.object_score_logits(label)
    tracked = [2, 3, 4, 5]
    assert np.isfinite(s[tracked]).all()
    assert np.isnan(s[[0, 1, 6, 7]]).all()
    assert (s[tracked] > 0).all()  # "present" (the +2 bias of the test network)
    with pytest.raises(KeyError):
        state.object_score_logits(12345)
    predictor.close(state)


# ---------------------------------------------------------------------------------- post-processing


def test_non_overlap_masks(model, cells):
    """Two neighbouring clicks: without the constraint the random network's masks overlap; with it
    no pixel is positive in two objects, on the prompted frame and during propagation."""
    (a, xa, ya), (b, xb, yb) = centres(cells)[:2]
    results = {}
    for flag in (False, True):
        p = VideoPredictor(model, non_overlap_masks=flag)
        state = p.init_state(cells.image)
        click(p, state, 0, a, xa, ya)
        _, _, m = click(p, state, 0, b, xb, yb)
        outs = [m] + [masks for _, _, masks in p.propagate_in_video(state, max_frame_num_to_track=2)]
        results[flag] = outs
        p.close(state)
    overlap = [int(((m > 0).sum(0) > 1).sum()) for m in results[False]]
    assert min(overlap) > 0, "test needs overlapping masks to mean anything"
    for m in results[True]:
        assert int(((m > 0).sum(0) > 1).sum()) == 0
    # the winner of each pixel keeps its logits
    for m_free, m_excl in zip(results[False], results[True]):
        best = m_free.max(0).values
        torch.testing.assert_close(m_excl.max(0).values, best)


def test_non_overlapping_function():
    logits = torch.tensor([[[[2.0, -1.0, 0.5]]], [[[1.0, 3.0, 0.5]]], [[[-5.0, 0.0, -20.0]]]])
    out = non_overlapping(logits)
    # pixel 0: object 0 wins; pixel 1: object 1; pixel 2: a tie goes to the first object
    assert out[0, 0, 0].tolist() == [2.0, -10.0, 0.5]
    assert out[1, 0, 0].tolist() == [-10.0, 3.0, -10.0]
    assert out[2, 0, 0].tolist() == [-10.0, -10.0, -20.0]
    assert int(((out > 0).sum(0) > 1).sum()) == 0
    single = torch.randn(1, 1, 4, 4)
    assert torch.equal(non_overlapping(single), single)


def _holey_logits() -> torch.Tensor:
    """2 x 1 x 24 x 24 positive logits with background regions of known areas (8-connectivity)."""
    m = torch.full((2, 1, 24, 24), 3.0)
    m[0, 0, 2, 2] = -1.0  # 1 px hole
    m[0, 0, 5:7, 5:9] = -2.0  # 8 px hole: <= 8, filled
    m[0, 0, 10:13, 10:13] = -2.0  # 9 px hole: kept
    m[0, 0, 16, 16] = 0.0  # a logit of exactly 0 is background
    m[0, 0, 17, 17] = -1.0  # diagonal neighbour of (16, 16): one 2 px component
    m[0, 0, 0, 20:23] = -4.0  # 3 px background touching the border: filled too (any component)
    m[1, 0, :12] = -5.0  # a large background half: kept
    m[1, 0, 18, 3] = -0.5
    return m


def test_fill_holes_semantics():
    m = _holey_logits()
    out = fill_holes(m, 8)
    filled = (m <= 0) & (out > 0)
    assert (out[filled] == 0.1).all(), "holes are filled with a small positive score, 0.1"
    assert filled[0, 0, 2, 2] and filled[0, 0, 5:7, 5:9].all() and filled[0, 0, 16, 16] and filled[0, 0, 17, 17]
    assert filled[0, 0, 0, 20:23].all()
    assert not filled[0, 0, 10:13, 10:13].any() and torch.equal(out[0, 0, 10:13, 10:13], m[0, 0, 10:13, 10:13])
    assert not filled[1, 0, :12].any() and filled[1, 0, 18, 3]
    assert torch.equal(out[m > 0], m[m > 0]), "foreground untouched"
    assert torch.equal(fill_holes(m, 0), m)
    assert filled[0, 0, 10:13, 10:13].sum() == 0 and fill_holes(m, 9)[0, 0, 11, 11] == 0.1


def test_fill_holes_matches_reference(require_reference):
    """Against the reference's fill_holes_in_mask_scores with the CPU connected components of
    tests/reference.py (the exact semantics of its CUDA kernel)."""
    from reference import install_cpu_connected_components
    from sam2.utils.misc import fill_holes_in_mask_scores

    install_cpu_connected_components()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, 64, 64, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1) + 0.3  # blobs and holes of all sizes
    for m in (_holey_logits(), smooth, -smooth):
        for area in (1, 8, 30):
            assert torch.equal(fill_holes(m, area), fill_holes_in_mask_scores(m, area)), area


def test_predictor_fills_a_small_hole_in_a_mask_prompt(model):
    """A mask prompt with a 4 x 4 hole (1 pixel of the network's 1/4-resolution mask logits) comes
    back filled (0.1); a 16 x 16 hole (16 pixels > fill_hole_area 8) is kept; fill_hole_area=0
    keeps both."""
    video = np.random.default_rng(0).integers(100, 200, (2, SIZE, SIZE)).astype(np.uint16)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:112, 16:112] = True
    mask[40:44, 40:44] = False  # low-res pixel (10, 10)
    mask[72:88, 72:88] = False  # low-res pixels 18..21
    low, video_res = {}, {}
    for area in (8, 0):
        p = VideoPredictor(model, fill_hole_area=area)
        state = p.init_state(video)
        _, _, m = p.add_new_mask(state, 0, 1, mask)
        video_res[area] = m[0, 0]
        low[area] = state.objects[1].temp["cond"][0]["pred_masks"][0, 0]
        p.close(state)
    assert low[0].shape == (SIZE // 4, SIZE // 4)
    assert low[0][10, 10] < 0 and (low[0][18:22, 18:22] < 0).all()
    assert low[8][10, 10] == pytest.approx(0.1), "the 1-pixel hole must be filled with 0.1"
    assert (low[8][18:22, 18:22] < 0).all(), "a hole larger than fill_hole_area must be kept"
    changed = (low[8] != low[0]).nonzero().tolist()
    assert changed == [[10, 10]]
    # at the video's resolution the filled hole is positive, the large one still negative
    assert video_res[8][40:44, 40:44].min() > video_res[0][40:44, 40:44].min()
    assert (video_res[8][40:44, 40:44] > 0).all() and (video_res[8][76:84, 76:84] < 0).all()


# ------------------------------------------------------------------------------------- corrections


@pytest.fixture(scope="module")
def corrected_session(predictor, cells):
    """Object clicked on frame 0, tracked through the video, then corrected on frame 3."""
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 0, label, x, y)
    first = {t: m.clone() for t, _, m in predictor.propagate_in_video(state)}
    _, _, corrected = predictor.add_new_points_or_box(state, 3, label, points=[[x + 6, y + 6]], labels=[0], clear_old_points=False)
    yield state, label, first, corrected
    predictor.close(state)


def test_click_on_a_tracked_frame_is_a_correction(corrected_session, predictor):
    state, label, first, corrected = corrected_session
    obj = state.objects[label]
    assert 3 not in obj.cond and 3 in obj.temp["non_cond"], "a click on a tracked frame is not a conditioning frame"
    assert list(obj.cond) == [0]
    assert (corrected - first[3]).abs().max() > 1e-3, "the correction must change that frame's mask"
    assert obj.point_inputs[3]["point_coords"].shape[1] == 1


def test_propagation_after_a_correction_uses_it(corrected_session, predictor):
    state, label, first, corrected = corrected_session
    later = {t: m for t, _, m in predictor.propagate_in_video(state, start_frame_idx=4)}
    assert sorted(later) == [4, 5, 6, 7]
    for t in later:
        assert (later[t] - first[t]).abs().max() > 1e-4, f"frame {t} ignores the correction on frame 3"


def test_full_repropagation_overwrites_a_correction_like_the_official_predictor(predictor, cells):
    """sam2==1.1.0 semantics (add_all_frames_to_correct_as_cond=False): propagation re-tracks every
    non-conditioning frame, the corrected one included, so re-propagating from the first prompt gives
    the first run again (facebookresearch/sam2 issues #546, #719, #731). Tied to parity; if this
    changes on purpose (corrections kept as conditioning frames), update this test."""
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 0, label, x, y)
    first = {t: m.clone() for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    predictor.add_new_points_or_box(state, 2, label, points=[[x + 6, y + 6]], labels=[0], clear_old_points=False)
    again = {t: m for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    assert sorted(again) == sorted(first)
    for t in first:
        assert torch.equal(again[t], first[t])
    predictor.close(state)


def test_corrections_as_conditioning_frames_survive_repropagation(model, cells):
    """add_all_frames_to_correct_as_cond=True (the napari plugin's setting): a corrected frame becomes
    a conditioning frame, so propagating again from the first prompt keeps the correction and the
    frames after it change."""
    predictor = VideoPredictor(model, add_all_frames_to_correct_as_cond=True)
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 0, label, x, y)
    first = {t: m.clone() for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    _, _, at2 = predictor.add_new_points_or_box(state, 2, label, points=[[x + 6, y + 6]], labels=[0], clear_old_points=False)
    again = {t: m for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    assert 2 in state.objects[label].cond
    assert torch.equal(again[2], at2)  # the correction is kept as given
    assert torch.equal(again[0], first[0])  # the first prompt's frame is an input, not re-tracked
    # every conditioning frame is in every frame's memory (not just earlier ones), as in SAM2
    for t in (1, 3, 4):
        assert (again[t] - first[t]).abs().max() > 1e-4, f"frame {t} ignores the correction on frame 2"
    predictor.close(state)


def _run_log(predictor, monkeypatch) -> list[tuple[int, tuple]]:
    """(frame, objects) of every tracking step the predictor runs from now on."""
    log, run = [], predictor._run

    def logged(state, objs, t, **kw):
        log.append((t, tuple(o.obj_id for o in objs)))
        return run(state, objs, t, **kw)

    monkeypatch.setattr(predictor, "_run", logged)
    return log


def test_repropagation_runs_only_the_steps_whose_inputs_changed(model, cells, monkeypatch):
    """After a correction of one object, propagating again recomputes that object only: the others'
    steps would read exactly what they read before (prompts, memories, direction, weights) and give
    what they gave, which is what the official predictor recomputes. A new object costs its own steps;
    weights changed in place make every step run again."""
    predictor = VideoPredictor(model, add_all_frames_to_correct_as_cond=True)
    state = predictor.init_state(cells.image)
    objects = centres(cells)
    for label, x, y in objects:
        click(predictor, state, 0, label, x, y)
    first = {t: m.clone() for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    log = _run_log(predictor, monkeypatch)
    label, x, y = objects[0]
    predictor.add_new_points_or_box(state, 2, label, points=[[x + 6, y + 6]], labels=[0], clear_old_points=False)
    log.clear()  # the correction's own decoder step
    again = {t: m.clone() for t, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    assert log == [(1, (label,)), (3, (label,)), (4, (label,))]
    for t in (1, 3, 4):
        assert (again[t][0] - first[t][0]).abs().max() > 1e-4  # the corrected object did change
        assert torch.equal(again[t][1:], first[t][1:])
    # the same masks as recomputing every step
    with monkeypatch.context() as m:
        m.setattr(predictor, "_reusable", lambda obj, t, key: False)
        recomputed = {t: mk for t, _, mk in predictor.propagate_in_video(state, max_frame_num_to_track=4)}
    for t in again:
        assert (recomputed[t] - again[t]).abs().max() <= 1e-5, t
    # a new object: its own steps only
    click(predictor, state, 0, 99, 10.0, 10.0)
    log.clear()
    list(predictor.propagate_in_video(state, max_frame_num_to_track=4))
    assert log == [(t, (99,)) for t in (1, 2, 3, 4)]
    # reverse passes are tracked apart: the first one runs, the second reuses it
    log.clear()
    list(predictor.propagate_in_video(state, start_frame_idx=4, reverse=True))
    assert {t for t, _ in log} == {1, 2, 3, 4}  # frame 2: a conditioning frame of the first object only
    log.clear()
    list(predictor.propagate_in_video(state, start_frame_idx=4, reverse=True))
    assert log == []
    # weights edited in place (a fine-tuned model loaded into it): nothing is taken from before
    with torch.no_grad():
        model.memory_attention.norm.bias.add_(0.0)
    log.clear()
    list(predictor.propagate_in_video(state, max_frame_num_to_track=4))
    assert sorted({o for _, objs in log for o in objs}) == sorted([o for o, _, _ in objects] + [99])
    predictor.close(state)


def test_a_model_built_under_inference_mode_propagates_and_repropagates(cells, monkeypatch):
    """Its weights are inference tensors (no version counter): propagation still knows them."""
    with torch.inference_mode():
        predictor = VideoPredictor(random_model(SIZE, seed=0, name=NAME), feature_cache=False)
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 0, label, x, y)
    first = [m.clone() for _, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=2)]
    log = _run_log(predictor, monkeypatch)
    again = [m for _, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=2)]
    assert log == [] and all(torch.equal(a, b) for a, b in zip(first, again))


# ----------------------------------------------------------------------------- prompt management


def test_clear_all_prompts_in_frame(predictor, cells):
    state = predictor.init_state(cells.image)
    (a, xa, ya), (b, xb, yb) = centres(cells)[:2]
    click(predictor, state, 0, a, xa, ya)
    click(predictor, state, 0, b, xb, yb)
    label, x, y = centres(cells, 2)[0]
    click(predictor, state, 2, a, x, y)  # a second conditioning frame for object a
    list(predictor.propagate_in_video(state, max_frame_num_to_track=3))
    assert sorted(state.objects[a].cond) == [0, 2]
    t, ids, masks = predictor.clear_all_prompts_in_frame(state, 2, a)
    assert (t, ids, masks.shape) == (2, [a, b], (2, 1, *cells.image.shape[1:]))
    assert list(state.objects[a].cond) == [0] and 2 not in state.objects[a].point_inputs
    assert state.objects[a].tracked[2] == 0
    assert frames_of(predictor.propagate_in_video(state, max_frame_num_to_track=3)) == [0, 1, 2, 3]
    # clearing the last prompt of an object leaves it without any: propagation says so
    assert predictor.clear_all_prompts_in_frame(state, 0, b, need_output=False) is None
    with pytest.raises(RuntimeError, match=rf"object {b}\b.*no prompt"):
        list(predictor.propagate_in_video(state))
    predictor.close(state)


def test_clear_a_pending_prompt(predictor, cells):
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 1, label, x, y)
    _, ids, masks = predictor.clear_all_prompts_in_frame(state, 1, label)
    assert ids == [label] and (masks == NO_OBJ).all()
    assert not state.objects[label].temp["cond"]
    with pytest.raises(RuntimeError, match="no prompt"):
        list(predictor.propagate_in_video(state))
    predictor.close(state)


def test_remove_object(predictor, cells):
    state = predictor.init_state(cells.image)
    (a, xa, ya), (b, xb, yb) = centres(cells)[:2]
    click(predictor, state, 0, a, xa, ya)
    click(predictor, state, 0, b, xb, yb)
    list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    ids, updated = predictor.remove_object(state, a)
    assert ids == [b] == state.obj_ids
    assert [t for t, _ in updated] == [0] and updated[0][1].shape == (1, 1, *cells.image.shape[1:])
    out = list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    assert all(ids == [b] and m.shape[0] == 1 for _, ids, m in out)
    # unknown ids: silently ignored, or a KeyError naming the known ids with strict=True
    assert predictor.remove_object(state, 999) == ([b], [])
    with pytest.raises(KeyError, match=rf"999.*\[{b}\]"):
        predictor.remove_object(state, 999, strict=True)
    # the last object: the session is empty again
    ids, _ = predictor.remove_object(state, b)
    assert ids == [] and state.obj_ids == []
    with pytest.raises(RuntimeError, match="no prompt"):
        list(predictor.propagate_in_video(state))
    predictor.close(state)


def test_reset_state(predictor, cells):
    state = predictor.init_state(cells.image)
    label, x, y = centres(cells)[0]
    click(predictor, state, 0, label, x, y)
    first = [m for _, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=2)]
    predictor.reset_state(state)
    assert state.obj_ids == []
    with pytest.raises(RuntimeError, match="no prompt"):
        list(predictor.propagate_in_video(state))
    # a fresh start on the same state gives the same result
    click(predictor, state, 0, label, x, y)
    again = [m for _, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=2)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    predictor.close(state)


# ----------------------------------------------------------------------------------------- devices


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_video_predictor(NAME, device="cuda", image_size=SIZE)


# --------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def session(predictor, cells):
    """A state with one clicked object (id 1) on frame 0, for error checks."""
    state = predictor.init_state(cells.image)
    _, x, y = centres(cells)[0]
    click(predictor, state, 0, 1, x, y)
    yield state
    predictor.close(state)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(frame_idx=8, points=[[10, 10]], labels=[1]), IndexError, r"frame index 8 is out of range.*8 frames"),
        (dict(frame_idx=-1, points=[[10, 10]], labels=[1]), IndexError, r"frame index -1 is out of range"),
        (dict(frame_idx=1.0, points=[[10, 10]], labels=[1]), TypeError, r"frame index must be an integer"),
        (dict(points=[[100, 10]], labels=[1]), ValueError, r"outside the 80 x 64 \(width x height\) frame"),
        (dict(points=[[10, -1]], labels=[1]), ValueError, r"outside"),
        (dict(points=[[0.5, 1.5]], labels=[1], normalize_coords=False), ValueError, r"outside the normalised range"),
        (dict(points=np.zeros((0, 2)), labels=np.zeros(0)), ValueError, r"points is empty"),
        (dict(points=[], labels=[]), ValueError, r"points"),
        (dict(points=[[10, 10]]), ValueError, r"points and labels must be given together"),
        (dict(labels=[1]), ValueError, r"points and labels must be given together"),
        (dict(points=[[10, 10], [20, 20]], labels=[1]), ValueError, r"2 points but labels of shape \(1,\)"),
        (dict(points=[[10, 10, 3]], labels=[1]), ValueError, r"shape \(N, 2\)"),
        (dict(points=[[10, 10]], labels=[5]), ValueError, r"labels must be 1 \(positive\) or 0"),
        (dict(points=[[np.nan, 10]], labels=[1]), ValueError, r"NaN"),
        (dict(), ValueError, r"give at least one prompt"),
        (dict(box=[30, 10, 20, 40]), ValueError, r"x1 < x0"),
        (dict(box=[10, 40, 20, 30]), ValueError, r"y1 < y0"),
        (dict(box=[10, 10, 20]), ValueError, r"box must be 4 finite numbers"),
        (dict(box=[10, 10, 200, 20]), ValueError, r"outside"),
    ],
)
def test_bad_prompt_is_a_clear_error(predictor, session, kwargs, exc, match):
    kwargs = {"frame_idx": 1, **kwargs}
    before = (session.obj_ids, {t: dict(p) for t, p in session.objects[1].point_inputs.items()})
    with pytest.raises(exc, match=match):
        predictor.add_new_points_or_box(session, obj_id=2, **kwargs)
    # a rejected prompt changes nothing: no new object, no stored clicks
    assert session.obj_ids == before[0] == [1]
    assert set(session.objects[1].point_inputs) == set(before[1])


def test_bad_mask_is_a_clear_error(predictor, session, cells):
    H, W = cells.image.shape[1:]
    with pytest.raises(ValueError, match=rf"mask shape \(32, 32\) does not match the video's frames \({H}, {W}\)"):
        predictor.add_new_mask(session, 1, 1, np.ones((32, 32), bool))
    with pytest.raises(ValueError, match=r"2D \(H, W\)"):
        predictor.add_new_mask(session, 1, 1, np.ones((1, H, W), bool))
    with pytest.raises(IndexError, match="out of range"):
        predictor.add_new_mask(session, 99, 1, np.ones((H, W), bool))


def test_unknown_object_and_bad_frame_in_clear(predictor, session):
    with pytest.raises(KeyError, match=r"unknown object id 42.*\[1\]"):
        predictor.clear_all_prompts_in_frame(session, 0, 42)
    with pytest.raises(IndexError, match="out of range"):
        predictor.clear_all_prompts_in_frame(session, 8, 1)


def test_propagate_bad_start_frame(predictor, session):
    with pytest.raises(IndexError, match=r"frame index 8 is out of range.*8 frames"):
        list(predictor.propagate_in_video(session, start_frame_idx=8))
    with pytest.raises(IndexError, match=r"frame index -2 is out of range"):
        list(predictor.propagate_in_video(session, start_frame_idx=-2, reverse=True))


def test_propagate_without_prompt_is_a_runtime_error(predictor, cells):
    state = predictor.init_state(cells.image)
    with pytest.raises(RuntimeError, match="no prompt yet"):
        next(iter(predictor.propagate_in_video(state)))


@pytest.mark.parametrize("shape", [(0, 32, 32), (0, 32, 32, 3)])
def test_empty_stack_is_a_clear_error(predictor, shape):
    with pytest.raises(ValueError, match="0 frames"):
        predictor.init_state(np.zeros(shape, np.uint16 if len(shape) == 3 else np.uint8))


def test_nan_in_a_sampled_frame_fails_at_init(predictor, cells):
    video = cells.image.astype(np.float32)
    video[3, 10, 10] = np.nan
    with pytest.raises(ValueError, match=r"frame 3 contains NaN"):
        predictor.init_state(video)
    video[3, 10, 10] = np.inf
    with pytest.raises(ValueError, match=r"frame 3 contains infinite"):
        predictor.init_state(video)


def test_nan_in_a_frame_read_during_propagation(predictor):
    """NaN in a frame the percentile sample skips: propagation delivers every frame before it, then
    stops with an error naming the frame."""
    ts = make_timelapse(n_frames=20, shape=(48, 48), n_cells=1, divide=False, enter=False, seed=3)
    video = ts.image.astype(np.float32)
    bad = 7  # the 16-frame sample of 20 frames is 0 1 3 4 5 6 8 9 ...: frame 7 is not in it
    video[bad, 20:22, 20:22] = np.nan
    state = predictor.init_state(video)
    label, x, y = centres(ts)[0]
    click(predictor, state, 0, label, x, y)
    delivered = []
    with pytest.raises(ValueError, match=rf"frame {bad} contains NaN"):
        for t, _, masks in predictor.propagate_in_video(state):
            assert torch.isfinite(masks).all()
            delivered.append(t)
    assert delivered == list(range(bad))
    # a prompt on the bad frame is an error too
    with pytest.raises(ValueError, match=rf"frame {bad} contains NaN"):
        click(predictor, state, bad, label, x, y)
    predictor.close(state)


def test_a_prompt_that_fails_leaves_the_session_unchanged(predictor):
    video = np.random.default_rng(0).integers(100, 200, (20, 32, 32)).astype(np.float32)
    video[7, 3, 3] = np.nan  # frame 7 is not in the percentile sample
    state = predictor.init_state(video)
    predictor.add_new_points_or_box(state, 0, 1, points=[[5, 5]], labels=[1])
    with pytest.raises(ValueError, match="frame 7 contains NaN"):
        predictor.add_new_points_or_box(state, 7, 2, points=[[5, 5]], labels=[1])
    assert state.obj_ids == [1]
    # the session still propagates (until the bad frame)
    assert frames_of(predictor.propagate_in_video(state, max_frame_num_to_track=2)) == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:guessed axes")
def test_bad_options(model, cells):
    with pytest.raises(ValueError, match="history must be 'disk' or 'ram'"):
        VideoPredictor(model, history="memory")
    p = VideoPredictor(model)
    with pytest.raises(ValueError, match="normalize must be"):
        p.init_state(cells.image, normalize="zscore")
    with pytest.raises(ValueError, match="normalize='reference'.*uint16"):
        p.init_state(cells.image, normalize="reference")
    with pytest.raises(ValueError, match="channel"):
        p.init_state(np.zeros((2, 2, 32, 32), np.uint16))  # (T, C, Y, X) with 2 channels: which one?
