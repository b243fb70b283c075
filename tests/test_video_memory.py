"""Bounded memory of the video predictor: the per-object FrameStore (RAM window + disk spill) and
what a propagation keeps at every frame.

The reference predictor keeps every frame (12 MiB at 1024) and, per object per frame, its memory
and mask logits forever; ours keeps a window of ``ram_frames`` tracked frames per object in RAM,
spills older ones to a temporary folder (``history="disk"``) or drops them (``history="ram"``), and
caches the image features of 2 frames. Spilling must not change any result.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from models import random_model

from napari_sam2.predictor import VideoPredictor
from napari_sam2.predictor.store import ENTRY_KEYS, FrameStore, SpillDir
from napari_sam2.synthetic import make_timelapse

NAME = "sam2.1_hiera_tiny"
SIZE = 128
T_LONG = 40
RAM = 16


def entry(t: int, g: torch.Generator) -> dict:
    """A tracked frame's entry as the predictor stores it (batch of 1; memory in bf16)."""
    return {
        "maskmem_features": torch.randn(1, 64, 8, 8, generator=g).to(torch.bfloat16),
        "pred_masks": torch.randn(1, 1, 32, 32, generator=g),
        "obj_ptr": torch.randn(1, 256, generator=g),
        "object_score_logits": torch.full((1, 1), float(t)),
    }


def same(a: dict, b: dict) -> bool:
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in ENTRY_KEYS)


def files(folder) -> set[str]:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


# ------------------------------------------------------------------------------------ FrameStore


def test_ram_window_is_bounded_and_spilled_entries_read_back_bit_equal(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = FrameStore(30, ram_frames=4, spill_dir=str(tmp_path))
    written = {}
    for t in range(30):
        written[t] = entry(t, g)
        store[t] = written[t]
        assert len(store._ram) <= 4
        assert len(store) == t + 1
        assert len(files(tmp_path)) == max(0, t + 1 - 4)
    assert store.frames() == list(range(30))
    assert set(store._ram) == {26, 27, 28, 29}
    for t in range(30):
        got = store[t]
        assert same(got, written[t]), f"frame {t} changed on its way through the disk"
        assert got["maskmem_features"].dtype == torch.bfloat16
        assert len(store._ram) <= 4
    assert store.get(30) is None and store.get(-1) is None and 30 not in store
    assert store.has_mask([-1, 0, 29, 30]) == (False, True, True, False)


def test_overwrite_and_pop_remove_stale_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    store = FrameStore(20, ram_frames=2, spill_dir=str(tmp_path))
    for t in range(10):
        store[t] = entry(t, g)
    assert "0000003.pt" in files(tmp_path)
    new = entry(3, g)
    store[3] = new  # the copy on disk is stale: it must go
    assert "0000003.pt" not in files(tmp_path)
    for t in range(10, 14):  # push 3 out of RAM again: the new version is spilled
        store[t] = entry(t, g)
    assert "0000003.pt" in files(tmp_path)
    assert same(store[3], new)
    # pop a spilled frame and an in-RAM frame
    store.pop(5)
    assert 5 not in store and "0000005.pt" not in files(tmp_path) and store.get(5) is None
    store.pop(13)
    assert 13 not in store and 13 not in store._ram
    assert store.pop(19, "default") == "default"
    on_disk = set(np.flatnonzero(store._on_disk).tolist())
    assert len(store) == 12 and set(store.frames()) == set(store._ram) | on_disk
    assert files(tmp_path) == {f"{t:07d}.pt" for t in on_disk}
    store.clear()
    assert len(store) == 0 and not store._ram and files(tmp_path) == set()


def test_clear_does_not_read_spilled_frames_back(tmp_path, monkeypatch):
    import napari_sam2.predictor.store as store_module

    g = torch.Generator().manual_seed(3)
    store = FrameStore(50, ram_frames=4, spill_dir=str(tmp_path))
    for t in range(50):
        store[t] = entry(t, g)
    calls = {"load": 0, "save": 0}
    load, save = torch.load, torch.save

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(store_module.torch, "load", counting("load", load))
    monkeypatch.setattr(store_module.torch, "save", counting("save", save))
    store.clear()
    assert files(tmp_path) == set()
    assert calls == {"load": 0, "save": 0}


def test_history_ram_drops_old_frames():
    g = torch.Generator().manual_seed(2)
    store = FrameStore(40, ram_frames=16, spill_dir=None)
    for t in range(40):
        store[t] = entry(t, g)
        assert len(store._ram) <= 16
    assert store.frames() == list(range(24, 40)) and len(store) == 16
    assert store.get(0) is None and 0 not in store


def test_spill_dir_is_removed_by_close_and_by_garbage_collection(model, tmp_path):
    video = np.random.default_rng(0).integers(100, 200, (4, 32, 32)).astype(np.uint16)
    p = VideoPredictor(model, spill_dir=str(tmp_path))
    state = p.init_state(video)
    folder = state.spill.path
    assert os.path.isdir(folder) and os.path.dirname(folder) == str(tmp_path)
    p.close(state)
    assert not os.path.exists(folder)
    state = p.init_state(video)
    folder = state.spill.path
    assert os.path.isdir(folder)
    del state
    gc.collect()
    assert not os.path.exists(folder)
    # history="ram": no folder at all
    state = VideoPredictor(model, history="ram", spill_dir=str(tmp_path)).init_state(video)
    assert state.spill is None and files(tmp_path) == set()
    # a SpillDir on its own
    s = SpillDir(str(tmp_path))
    path = s.path
    del s
    gc.collect()
    assert not os.path.exists(path)


def test_ram_frames_is_at_least_what_a_step_reads(model):
    assert VideoPredictor(model, ram_frames=4).ram_frames == 16


# ------------------------------------------------------------------------------ long propagation


@pytest.fixture(scope="module")
def model():
    return random_model(SIZE, seed=0, name=NAME)


@pytest.fixture(scope="module")
def video():
    """40 frames of 64 x 64 with 2 cells."""
    ts = make_timelapse(n_frames=T_LONG, shape=(64, 64), n_cells=2, divide=False, enter=False, seed=5)
    return ts.image, [(int(r.obj_id), float(r.x), float(r.y)) for r in ts.clicks(0).itertuples()]


def _session(predictor, video):
    image, clicks = video
    state = predictor.init_state(image)
    for label, x, y in clicks:
        predictor.add_new_points_or_box(state, 0, label, points=[[x, y]], labels=[1])
    return state


def _check_bounded(state, t: int, history: str) -> None:
    assert len(state.features.in_ram) <= 2, f"frame {t}: {len(state.features.in_ram)} frames of features in RAM"
    for obj in state.objects.values():
        store = obj.non_cond
        assert len(store._ram) <= RAM, f"frame {t}: {len(store._ram)} entries in RAM"
        tracked = set(store.frames())
        on_disk = set(np.flatnonzero(store._on_disk).tolist())
        assert tracked == set(store._ram) | on_disk
        if history == "disk":
            # every frame tracked so far (frame 0 is a conditioning frame, kept apart) is kept
            assert tracked == set(range(1, t + 1))
            assert {f"{f:07d}.pt" for f in on_disk} == files(store.spill_dir)
            assert len(on_disk) >= t - RAM
        else:
            assert not on_disk and store.spill_dir is None
            assert len(tracked) == min(t, RAM)


@pytest.fixture(scope="module")
def disk_run(model, video):
    """history="disk", ram_frames=16, 40 frames, 2 objects: bounds checked at every yielded frame,
    then a second propagation over the spilled data, every step recomputed (with nothing changed it
    would reuse every step's result: no entry would look as it was computed)."""
    p = VideoPredictor(model, history="disk", ram_frames=RAM)
    state = _session(p, video)
    first = {}
    for t, _ids, masks in p.propagate_in_video(state):
        _check_bounded(state, t, "disk")
        first[t] = masks.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(p, "_reusable", lambda obj, t, key: False)
        again = {t: masks for t, _, masks in p.propagate_in_video(state)}
    disk_files = sum(len(files(o.non_cond.spill_dir)) for o in state.objects.values())
    folder = state.spill.path
    p.close(state)
    return first, again, disk_files, folder


def test_propagation_keeps_a_bounded_window_in_ram_and_spills_the_rest(disk_run):
    first, _, disk_files, folder = disk_run
    assert sorted(first) == list(range(T_LONG))
    assert disk_files == 2 * (T_LONG - 1 - RAM)
    assert not os.path.exists(folder), "close() removes the spilled frames"


def test_repropagation_over_spilled_frames_gives_the_same_masks(disk_run):
    first, again, _, _ = disk_run
    assert sorted(again) == sorted(first)
    for t in first:
        assert torch.equal(again[t], first[t]), f"frame {t} differs on the second propagation"


def test_spilling_changes_nothing(model, video, disk_run):
    """history="disk" with a 16-frame window == a window that never spills."""
    first = disk_run[0]
    p = VideoPredictor(model, history="disk", ram_frames=10**6)
    state = _session(p, video)
    for t, _, masks in p.propagate_in_video(state):
        assert torch.equal(masks, first[t]), f"frame {t}"
    assert all(not o.non_cond._on_disk.any() for o in state.objects.values())
    p.close(state)


def test_history_ram_is_bounded_and_gives_the_same_first_pass(model, video, disk_run):
    first = disk_run[0]
    p = VideoPredictor(model, history="ram", ram_frames=RAM)
    state = _session(p, video)
    assert state.spill is None
    for t, _, masks in p.propagate_in_video(state):
        _check_bounded(state, t, "ram")
        assert torch.equal(masks, first[t]), f"frame {t}"
    p.close(state)
