"""Precision as a choice (auto / fp32 / bf16), device checks, and the device-path defects a CPU can show."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from models import random_model

from napari_sam2 import ImagePredictor, build_model
from napari_sam2.build import resolve_device
from napari_sam2.modeling import position_encoding
from napari_sam2.precision import resolve_precision
from napari_sam2.predictor.video import VideoPredictor, default_max_batch
from napari_sam2.synthetic import make_timelapse

CPU = torch.device("cpu")


@pytest.fixture
def auto_precision(monkeypatch):
    """The suite pins fp32; these tests look at what "auto" decides by itself."""
    monkeypatch.delenv("NAPARI_SAM2_PRECISION", raising=False)
    return monkeypatch


def test_auto_is_bf16_only_where_the_cpu_computes_it(auto_precision):
    auto_precision.setattr("napari_sam2.precision.cpu_bf16_features", lambda: [])
    chosen, why = resolve_precision("auto", CPU)
    assert chosen == "fp32" and "neither AMX nor AVX-512 BF16" in why
    auto_precision.setattr("napari_sam2.precision.cpu_bf16_features", lambda: ["amx_bf16", "avx512_bf16"])
    chosen, why = resolve_precision("auto", CPU)
    assert chosen == "bf16" and "AMX-BF16" in why
    auto_precision.setattr("napari_sam2.precision.cpu_bf16_features", lambda: ["avx512_bf16"])
    assert resolve_precision(None, CPU)[0] == "bf16"


def test_auto_on_cuda_needs_compute_capability_8(auto_precision):
    cuda = torch.device("cuda", 0)
    auto_precision.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    auto_precision.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    chosen, why = resolve_precision("auto", cuda)
    assert chosen == "fp32" and "7.5 < 8" in why
    auto_precision.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H100")
    auto_precision.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert resolve_precision("auto", cuda)[0] == "bf16"
    assert resolve_precision("auto", torch.device("mps"))[0] == "fp32"


def test_the_environment_pins_auto_and_a_bad_value_is_named(auto_precision):
    auto_precision.setattr("napari_sam2.precision.cpu_bf16_features", lambda: ["amx_bf16"])
    auto_precision.setenv("NAPARI_SAM2_PRECISION", "fp32")
    assert resolve_precision("auto", CPU) == ("fp32", "$NAPARI_SAM2_PRECISION=fp32")
    assert resolve_precision("bf16", CPU)[0] == "bf16"  # an explicit choice wins
    auto_precision.setenv("NAPARI_SAM2_PRECISION", "half")
    with pytest.raises(ValueError, match="NAPARI_SAM2_PRECISION must be fp32, bf16 or auto, got 'half'"):
        resolve_precision("auto", CPU)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", CPU)


def test_bf16_on_a_cpu_without_it_runs_and_says_it_will_be_slow(auto_precision, caplog):
    auto_precision.setattr("napari_sam2.precision.cpu_bf16_features", lambda: [])
    with pytest.warns(RuntimeWarning, match="bf16 is emulated and will be slow"):
        model = build_model(pretrained=False, image_size=128, precision="bf16")
    assert model.precision == "bf16" and model.compute_dtype == torch.bfloat16
    # the SAM heads stay fp32: masks, IoUs and object scores
    assert model.sam_mask_decoder.conv_s0.weight.dtype == torch.float32
    with caplog.at_level(logging.INFO, logger="napari_sam2"):
        build_model(pretrained=False, image_size=128)
    assert "sam2.1_hiera_tiny runs on cpu in fp32 (auto: this CPU has neither AMX nor AVX-512 BF16)" in caplog.text


def test_resolve_device_checks_what_is_there(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="Apple MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("banana")
    with pytest.raises(ValueError, match="runs on 'cpu', 'cuda' or 'mps'"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == CPU


def test_batches_are_sized_per_device():
    assert default_max_batch(CPU) == 4
    assert default_max_batch(torch.device("mps")) < default_max_batch(torch.device("cuda")) == 64


def test_rope_broadcasts_its_frequencies_without_a_complex_repeat(monkeypatch):
    """MPS has no complex ``repeat``; broadcasting gives the same bits."""
    angles = position_encoding.axial_rope_angles(64, 8, 8)
    freqs = torch.polar(torch.ones_like(angles), angles)  # 64 positions x 32
    x = torch.randn(2, 1, 3 * 64, 64)  # three frames of memory on one grid
    expected = torch.view_as_real(
        torch.view_as_complex(x.float().reshape(2, 1, 3 * 64, 32, 2)) * freqs.repeat(3, 1)
    ).flatten(-2)
    repeat = torch.Tensor.repeat

    def no_complex_repeat(self, *sizes):
        if self.is_complex():
            raise RuntimeError("complex repeat is not implemented on this device")
        return repeat(self, *sizes)

    monkeypatch.setattr(torch.Tensor, "repeat", no_complex_repeat)
    assert torch.equal(position_encoding.apply_rope(x, freqs), expected)


@pytest.fixture(scope="module")
def cells():
    return make_timelapse(n_frames=24, shape=(48, 48), n_cells=3, divide=False, enter=False, seed=2)


def test_preflight_can_be_called_directly(cells):
    predictor = VideoPredictor(random_model(128), feature_cache=False)
    state = predictor.init_state(cells.image)
    r = next(cells.clicks(0).itertuples())
    predictor.add_new_points_or_box(state, 0, 1, points=[[r.x, r.y]], labels=[1])
    predictor.propagate_in_video_preflight(state)  # outside inference mode, as the official API allows
    assert 0 in state.objects[1].cond
    assert [t for t, _, _ in predictor.propagate_in_video(state, max_frame_num_to_track=2)] == [0, 1, 2]


def test_a_spilled_frame_holds_one_object_not_its_batch(cells, tmp_path):
    predictor = VideoPredictor(random_model(128), feature_cache=False, spill_dir=str(tmp_path))
    state = predictor.init_state(cells.image)
    for r in cells.clicks(0).itertuples():
        predictor.add_new_points_or_box(state, 0, int(r.obj_id), points=[[r.x, r.y]], labels=[1])
    for _ in predictor.propagate_in_video(state):
        pass
    objects = list(state.objects.values())
    assert len(objects) == 3
    for obj in objects:
        entry = obj.non_cond[5]  # read back from disk
        for key, value in entry.items():
            assert value.shape[0] == 1
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    one = sum(v.numel() * v.element_size() for v in objects[0].non_cond[20].values())
    spilled = sorted((tmp_path).rglob("0000003.pt"))
    assert len(spilled) == 3 and all(p.stat().st_size < one + 4096 for p in spilled)


def test_the_image_predictor_uses_the_chosen_precision(cells):
    image = cells.image[0]
    r = next(cells.clicks(0).itertuples())
    masks = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(128).set_precision(dtype)
        predictor = ImagePredictor(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor.set_image(image)
        assert predictor.model.compute_dtype == dtype
        m, _, _ = predictor.predict(point_coords=np.array([[r.x, r.y]]), point_labels=np.array([1]),
                                    multimask_output=False)
        masks[dtype] = m[0] > 0
    a, b = masks[torch.float32], masks[torch.bfloat16]
    assert (a & b).sum() / max((a | b).sum(), 1) >= 0.95


def test_resizes_mps_lacks_before_torch_2_7_run_on_the_cpu():
    from napari_sam2.modeling.common import needs_cpu_resize

    assert needs_cpu_resize("mps", "2.5.1", "bicubic", False)
    assert needs_cpu_resize("mps", "2.6.0", "bilinear", True)
    assert not needs_cpu_resize("mps", "2.6.0", "bilinear", False)
    assert not needs_cpu_resize("mps", "2.7.0", "bicubic", False)
    assert not needs_cpu_resize("mps", "2.13.0+cpu", "bilinear", True)
    assert not needs_cpu_resize("cpu", "2.5.1", "bicubic", True)
    assert not needs_cpu_resize("cuda", "2.1.0", "bilinear", True)


def test_a_tracking_step_copies_to_the_host_once_and_keeps_its_window_on_the_device(cells, monkeypatch):
    """On a GPU every device -> host copy is a synchronisation: a step of a batch of objects makes one
    (object scores and hole filling's background together), and the RAM window is not moved off the
    model's device (which the step would have to copy back up for every following step)."""
    predictor = VideoPredictor(random_model(128), feature_cache=False)
    state = predictor.init_state(cells.image)
    for r in cells.clicks(0).itertuples():
        predictor.add_new_points_or_box(state, 0, int(r.obj_id), points=[[r.x, r.y]], labels=[1])
    predictor.propagate_in_video_preflight(state)
    copies = []
    for name in ("cpu", "item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            copies.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = 0
    for t, ids, masks in predictor.propagate_in_video(state, max_frame_num_to_track=4):
        steps += t > 0
        assert masks.device == predictor.device and len(ids) == 3
    monkeypatch.undo()
    assert steps == 4 and len(copies) == steps, copies  # 3 objects, one batch: one copy per step
    for obj in state.objects.values():
        assert obj.non_cond.device == predictor.device
        assert np.isfinite(obj.scores[:5]).all()
