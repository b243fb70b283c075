"""Each frame is encoded once per stack: across prompts, passes, sessions, predictors and processes,
never served for other pixels, another model, size, normalisation or precision, and never when damaged."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from models import random_model

from napari_sam2 import embed_stack, segment_stack
from napari_sam2.predictor.feature_cache import DiskFeatureCache, MemoryFeatureCache
from napari_sam2.predictor.video import VideoPredictor
from napari_sam2.synthetic import make_timelapse

SIZE = 128
T = 6
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def model():
    return random_model(SIZE, seed=0)


@pytest.fixture(scope="module")
def cells():
    return make_timelapse(n_frames=T, shape=(48, 48), n_cells=2, divide=False, enter=False, seed=4)


def counting(model):
    """A copy of ``model`` whose image encoder counts its calls (the copy has the same weights)."""
    m = copy.deepcopy(model)
    m.calls = 0
    encode = m.encode_frame

    def encode_frame(image):
        m.calls += image.shape[0]
        return encode(image)

    m.encode_frame = encode_frame
    return m


def session(predictor, video, clicks, **init):
    """Click, propagate, refine on frame 3, propagate again, then backward: every output, in order."""
    state = predictor.init_state(video, **init)
    outs = []
    for obj, x, y in clicks:
        outs.append(predictor.add_new_points_or_box(state, 0, obj, points=[[x, y]], labels=[1])[2])
    outs += [m for _, _, m in predictor.propagate_in_video(state)]
    obj, x, y = clicks[0]
    outs.append(predictor.add_new_points_or_box(state, 3, obj, points=[[x + 1, y]], labels=[1])[2])
    outs += [m for _, _, m in predictor.propagate_in_video(state)]
    outs += [m for _, _, m in predictor.propagate_in_video(state, start_frame_idx=3, reverse=True)]
    return state, outs


def clicks_of(cells):
    return [(int(r.obj_id), float(r.x), float(r.y)) for r in cells.clicks(0).itertuples()]


def test_each_frame_is_encoded_once_across_passes_sessions_and_predictors(model, cells, tmp_path):
    cache = tmp_path / "features"
    first = counting(model)
    state, outs = session(VideoPredictor(first, feature_cache=cache), cells.image, clicks_of(cells))
    # clicks, three passes and a refinement: each of the T frames went through the encoder once
    assert first.calls == T and state.features.encoded == T
    # a later session and another process's predictor (same weights) encode nothing
    again = counting(model)
    state2, outs2 = session(VideoPredictor(again, feature_cache=cache), cells.image, clicks_of(cells))
    assert again.calls == 0 and state2.features.from_cache >= T
    # and the cached fp32 features are the encoder's exact bits: the same masks as without any cache
    plain = counting(model)
    _, outs3 = session(VideoPredictor(plain, feature_cache=False), cells.image, clicks_of(cells))
    assert plain.calls > T  # without the cache, passes re-encode what left the last-2-frames RAM window
    assert len(outs) == len(outs2) == len(outs3)
    for a, b, c in zip(outs, outs2, outs3):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_an_edited_frame_is_encoded_again_and_the_others_reused(model, cells, tmp_path):
    cache = tmp_path / "features"
    fixed = (float(cells.image.min()), float(cells.image.max()))  # the same range for both stacks
    VideoPredictor(model, feature_cache=cache).precompute(
        VideoPredictor(model, feature_cache=cache).init_state(cells.image, normalize=fixed))
    edited = cells.image.copy()
    edited[2, 10:20, 10:20] = edited[2].max()
    m = counting(model)
    predictor = VideoPredictor(m, feature_cache=cache)
    state = predictor.init_state(edited, normalize=fixed)
    assert predictor.precompute(state) == 1 and m.calls == 1
    # a stack-wide change of the normalisation (percentiles of another stack) invalidates every frame
    brighter = (cells.image.astype(np.float32) * 1.7).astype(cells.image.dtype)
    assert predictor.precompute(predictor.init_state(brighter)) == T


def test_another_model_size_normalisation_or_precision_is_never_served(model, cells, tmp_path):
    cache = tmp_path / "features"
    base = VideoPredictor(model, feature_cache=cache)
    assert base.precompute(base.init_state(cells.image)) == T
    assert base.precompute(base.init_state(cells.image)) == 0
    other_weights = random_model(SIZE, seed=1)
    other_size = random_model(SIZE + 64, seed=0)
    for other in (other_weights, other_size):
        p = VideoPredictor(other, feature_cache=cache)
        assert p.precompute(p.init_state(cells.image)) == T
    assert base.precompute(base.init_state(cells.image, normalize=(0.0, 1000.0))) == T
    assert base.precompute(base.init_state(cells.image, percentiles=(1.0, 99.0))) == T
    half = copy.deepcopy(model).set_precision(torch.bfloat16)
    p = VideoPredictor(half, feature_cache=cache)
    state = p.init_state(cells.image)
    assert p.precompute(state, frames=[0, 1]) == 2
    assert state.features(0).embed.dtype == torch.bfloat16  # kept in the precision it was computed in
    # weights changed in place (as fine-tuning does) are another model too
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.image_encoder.trunk.patch_embed.proj.bias.add_(0.01)
    p = VideoPredictor(changed, feature_cache=cache)
    assert p.precompute(p.init_state(cells.image)) == T


def entry_chunks(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.parent.name == "c")


def test_a_corrupt_or_truncated_entry_is_recomputed_never_used(model, cells, tmp_path):
    cache = tmp_path / "features"
    predictor = VideoPredictor(model, feature_cache=cache)
    _, clean = session(predictor, cells.image, clicks_of(cells))
    chunks = entry_chunks(cache)
    assert len(chunks) == T
    data = chunks[1].read_bytes()
    chunks[1].write_bytes(data[: len(data) // 2])  # truncated (a full disk, a killed copy)
    damaged = bytearray(chunks[4].read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF  # one flipped byte
    chunks[4].write_bytes(bytes(damaged))
    m = counting(model)
    state, outs = session(VideoPredictor(m, feature_cache=cache), cells.image, clicks_of(cells))
    assert m.calls == 2
    for a, b in zip(clean, outs):
        assert torch.equal(a, b)
    # the entries were rewritten whole
    m2 = counting(model)
    session(VideoPredictor(m2, feature_cache=cache), cells.image, clicks_of(cells))
    assert m2.calls == 0


def test_an_unwritable_cache_folder_falls_back_to_memory_with_one_warning(model, cells, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    m = counting(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = VideoPredictor(m, feature_cache=blocker / "features")
        state, _ = session(predictor, cells.image, clicks_of(cells))
    notes = [w for w in caught if "feature cache folder" in str(w.message)]
    assert len(notes) == 1 and "kept in memory" in str(notes[0].message)
    assert predictor.feature_cache.in_memory
    assert m.calls == T  # the session still encodes each frame once
    assert blocker.read_text() == "not a folder"


def test_a_full_disk_falls_back_to_memory(model, cells, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        m = counting(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predictor = VideoPredictor(m, feature_cache=disk / "features")
            session(predictor, cells.image, clicks_of(cells))
        notes = [str(w.message) for w in caught if "feature cache folder" in str(w.message)]
        assert len(notes) == 1 and "No space left on device" in notes[0]
        assert m.calls == T
        assert not [p for p in (disk / "features").iterdir() if p.name.startswith(".writing-")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_size_cap_evicts_least_recently_used_entries(tmp_path):
    levels = (torch.randn(1, 8, 16, 16), torch.randn(1, 4, 32, 32))
    probe = DiskFeatureCache(tmp_path / "probe")
    probe.put("f" * 64, levels)
    entry = probe.size_bytes()  # one entry on disk, metadata included
    cap = int(5.5 * entry)
    cache = DiskFeatureCache(tmp_path / "features", max_bytes=cap)
    for i in range(5):
        cache.put(f"{i:064x}", levels)
        os.utime(cache._path(f"{i:064x}"), (1000 + i, 1000 + i))  # a clear order of use
    assert len(cache.entries()) == 5
    assert cache.get(f"{0:064x}") is not None  # used again: now the most recent
    cache.put(f"{5:064x}", levels)  # over the cap: down to 90 % of it, oldest first
    kept = {int(p.name.removesuffix(".zarr"), 16) for _, _, p in cache.entries()}
    assert kept == {0, 3, 4, 5}
    assert cache.size_bytes() <= 0.9 * cap
    got = cache.get(f"{5:064x}")
    assert all(torch.equal(a, b) for a, b in zip(got, levels))


def test_memory_cache_is_bounded():
    cache = MemoryFeatureCache(max_bytes=3 * 4096)
    for i in range(5):
        cache.put(str(i), (torch.zeros(1024),))
    assert cache.get("0") is None and cache.get("4") is not None


def test_two_processes_filling_one_cache_leave_it_whole(random_checkpoint, tmp_path):
    stack = tmp_path / "movie.tif"
    tifffile.imwrite(stack, make_timelapse(8, (64, 64), n_cells=2, seed=1).image)
    cache = tmp_path / "features"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "napari_sam2", "embed", str(stack), "--checkpoint", str(random_checkpoint),
            "--image-size", "128", "--device", "cpu", "--threads", "1", "--no-progress", "--features", str(cache)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert "runs on cpu in fp32" in results[0][1]
    entries = DiskFeatureCache(cache).entries()
    assert len(entries) == 8
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    for _, _, path in entries:  # every entry whole: its checksum holds
        key = path.name.removesuffix(".zarr")
        assert DiskFeatureCache._read(path, key) is not None
    third = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0 and "8 frames, 0 encoded, 8 already cached" in third.stdout


def test_embed_stack_then_segment_stack_runs_only_decoder_and_memory(model, cells, tmp_path):
    cache = tmp_path / "features"
    m = counting(model)
    predictor = VideoPredictor(m, feature_cache=cache)
    done = embed_stack(cells.image, predictor=predictor, progress=False)
    assert done == {"frames": T, "encoded": T, "cached": 0, "location": str(cache)}
    result = segment_stack(cells.image, points=cells.clicks(0)[["t", "y", "x"]].to_numpy(), predictor=predictor,
                           progress=False)
    assert m.calls == T and result.labels.max() > 0
    assert embed_stack(cells.image, predictor=predictor, progress=False)["encoded"] == 0


def test_embed_without_a_cache_is_a_clear_error(model, cells):
    with pytest.raises(ValueError, match="feature cache is off"):
        embed_stack(cells.image, predictor=VideoPredictor(model, feature_cache=False), progress=False)


def test_a_model_built_under_inference_mode_is_cached_too(cells, tmp_path):
    with torch.inference_mode():
        model = random_model(SIZE, seed=0)
        predictor = VideoPredictor(model, feature_cache=tmp_path / "features")
        assert predictor.precompute(predictor.init_state(cells.image)) == T
        assert predictor.precompute(predictor.init_state(cells.image)) == 0


def test_a_frame_the_background_cannot_read_is_read_in_the_caller(model, cells, tmp_path):
    """E.g. a dask array persisted on a cluster: the synchronous read of the prefetch thread fails."""
    predictor = VideoPredictor(model, feature_cache=tmp_path / "features")
    state = predictor.init_state(cells.image)
    raw = state.frames.raw
    background = []

    def raw_or_fail(t, scheduler=None):
        if scheduler is not None:
            background.append(t)
            raise RuntimeError("cannot be read from this thread")
        return raw(t)

    state.frames.raw = raw_or_fail
    obj, x, y = clicks_of(cells)[0]
    predictor.add_new_points_or_box(state, 0, obj, points=[[x, y]], labels=[1])
    frames = [t for t, _, _ in predictor.propagate_in_video(state)]
    assert frames == list(range(T)) and background  # prefetches were tried, failed, and did not matter
