"""Sanity tests of the reference oracle itself (tests/reference.py), not of napari_sam2."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import reference as R
import torch

# official key counts (sam2 / sam2.1), see /work/shared/SAM2_FACTS.md
KEY_COUNTS = {"sam2_hiera_tiny": 468, "sam2.1_hiera_tiny": 471}


def test_config_file_mapping():
    assert R.config_file("sam2_hiera_tiny") == "configs/sam2/sam2_hiera_t.yaml"
    assert R.config_file("sam2.1_hiera_small") == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert R.config_file("sam2.1_hiera_base_plus") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert R.config_file("sam2_hiera_large") == "configs/sam2/sam2_hiera_l.yaml"
    assert len(R.REFERENCE_NAMES) == 8
    with pytest.raises(ValueError, match="unknown model name"):
        R.config_file("sam3_hiera_tiny")


def test_config_files_exist(require_reference):
    import sam2

    root = Path(sam2.__file__).parent
    for name in R.REFERENCE_NAMES:
        assert (root / R.config_file(name)).is_file(), name


def test_build_tiny21_is_official_video_predictor(ref_tiny21):
    from sam2.modeling.sam2_base import SAM2Base
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    model, _ = ref_tiny21
    assert type(model) is SAM2VideoPredictor and isinstance(model, SAM2Base)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.device == torch.device("cpu")
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    # the overrides of sam2.build_sam.build_sam2_video_predictor
    dec = model.sam_mask_decoder
    assert dec.dynamic_multimask_via_stability is True
    assert dec.dynamic_multimask_stability_delta == 0.05
    assert dec.dynamic_multimask_stability_thresh == 0.98
    assert model.binarize_mask_from_pts_for_mem_enc is True
    assert model.fill_hole_area == 8
    # sam2.1 specifics
    assert model.add_tpos_enc_to_obj_ptrs and model.proj_tpos_enc_in_obj_ptrs
    assert model.use_signed_tpos_enc_to_obj_ptrs
    assert model.no_obj_embed_spatial is not None


def test_tiny20_config(ref_tiny20):
    model, _ = ref_tiny20
    assert model.fill_hole_area == 8 and model.binarize_mask_from_pts_for_mem_enc
    assert not model.add_tpos_enc_to_obj_ptrs and not model.proj_tpos_enc_in_obj_ptrs
    assert model.no_obj_embed_spatial is None


def test_every_tensor_perturbed_and_deterministic(ref_tiny21):
    model, _ = ref_tiny21
    sd = model.state_dict()
    plain_model = R.build_reference("sam2.1_hiera_tiny", 0, perturb=False)
    plain = {k: v.clone() for k, v in plain_model.state_dict().items()}
    assert sd.keys() == plain.keys()
    unchanged = [k for k in sd if torch.equal(sd[k], plain[k])]
    assert unchanged == []
    # no tensor of the perturbed model is all zeros (pos_embed, no_obj_ptr, biases, ...)
    assert [k for k, v in sd.items() if not v.abs().max() > 0] == []
    # the seeded init + seeded perturbation are deterministic: redoing the perturbation on the
    # plain build gives the same weights bit for bit, apart from the object-score bias
    R.perturb_(plain_model, 0)
    again = {k: v.clone() for k, v in plain_model.state_dict().items()}
    bias_key = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"
    assert all(torch.equal(sd[k], again[k]) for k in sd if k != bias_key)
    torch.testing.assert_close(sd[bias_key] - again[bias_key],
                               torch.full_like(again[bias_key], R.OBJ_SCORE_BIAS))
    # another seed -> other noise
    plain_model.load_state_dict(plain)
    R.perturb_(plain_model, 1)
    other = plain_model.state_dict()
    assert not any(torch.equal(other[k], again[k]) for k in sd)


@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2_hiera_tiny"])
def test_checkpoint_official_layout(name, reference_factory):
    model, path = reference_factory(name)
    from sam2.build_sam import _load_checkpoint

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(ckpt, dict) and list(ckpt) == ["model"]
    sd = ckpt["model"]
    assert len(sd) == KEY_COUNTS[name]
    assert sd.keys() == model.state_dict().keys()
    assert "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in sd  # a buffer
    has_tpos_proj = "obj_ptr_tpos_proj.weight" in sd
    assert has_tpos_proj == name.startswith("sam2.1")
    if has_tpos_proj:
        assert tuple(sd["obj_ptr_tpos_proj.weight"].shape) == (64, 256)
        assert tuple(sd["no_obj_embed_spatial"].shape) == (1, 64)
    # the official loader (strict) accepts it and restores the exact weights
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict(keep_vars=True).values():
            t.zero_()
    _load_checkpoint(fresh, str(path))
    fresh_sd = fresh.state_dict()
    assert all(torch.equal(fresh_sd[k], v) for k, v in sd.items())


def test_reference_checkpoint_is_cached_and_rng_untouched(tmp_path, require_reference):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    p1 = R.reference_checkpoint("sam2_hiera_tiny", 3, tmp_path)
    assert torch.equal(torch.rand(3), expected)  # building forks the global RNG
    assert p1 == tmp_path / "sam2_hiera_tiny_seed3.pt" and p1.is_file()
    mtime = p1.stat().st_mtime_ns
    p2 = R.reference_checkpoint("sam2_hiera_tiny", 3, tmp_path)
    assert p2 == p1 and p2.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [p1.name]  # no temp file left behind


@pytest.fixture(scope="module")
def tiny21_forward(ref_tiny21):
    """One encoder run: (image_encoder output levels, forward_image output) on sanity_image."""
    model, _ = ref_tiny21
    captured = {}

    def hook(module, args, out):  # before forward_image replaces levels 0, 1 in place
        captured["backbone_fpn"] = list(out["backbone_fpn"])
        captured["vision_pos_enc"] = list(out["vision_pos_enc"])
        captured["vision_features"] = out["vision_features"]

    handle = model.image_encoder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.forward_image(R.sanity_image(model, seed=0))
    finally:
        handle.remove()
    return captured, out


def test_forward_image_shapes_and_finite(ref_tiny21, tiny21_forward):
    model, _ = ref_tiny21
    enc, out = tiny21_forward
    # the image encoder (Hiera + FPN, scalp=1): 256 channels at strides 4, 8, 16
    assert [tuple(f.shape) for f in enc["backbone_fpn"]] == [
        (1, 256, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64)]
    assert [tuple(p.shape) for p in enc["vision_pos_enc"]] == [
        (1, 256, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64)]
    assert tuple(enc["vision_features"].shape) == (1, 256, 64, 64)
    # SAM2Base.forward_image then applies the decoder's conv_s0 / conv_s1 to the two high-res levels
    assert [tuple(f.shape) for f in out["backbone_fpn"]] == [
        (1, 32, 256, 256), (1, 64, 128, 128), (1, 256, 64, 64)]
    for f in enc["backbone_fpn"] + out["backbone_fpn"]:
        assert torch.isfinite(f).all()
    assert out["backbone_fpn"][2] is enc["backbone_fpn"][2]
    with torch.no_grad():
        torch.testing.assert_close(
            out["backbone_fpn"][0], model.sam_mask_decoder.conv_s0(enc["backbone_fpn"][0]))
        torch.testing.assert_close(
            out["backbone_fpn"][1], model.sam_mask_decoder.conv_s1(enc["backbone_fpn"][1]))


def test_outputs_look_sane(ref_tiny21, tiny21_forward):
    model, _ = ref_tiny21
    _, out = tiny21_forward
    report = R.sanity_report(model, seed=0, backbone_out=out)
    assert all(report["checks"].values()), report
    assert report["mask_logits_shape"] == (1, 3, 256, 256)
    assert report["backbone_fpn_shapes"] == [(1, 32, 256, 256), (1, 64, 128, 128), (1, 256, 64, 64)]


def test_cpu_connected_components_8_connectivity():
    m = torch.zeros(2, 1, 5, 6, dtype=torch.bool)
    m[0, 0, 0, 0] = m[0, 0, 1, 1] = m[0, 0, 2, 2] = True  # one diagonal component of 3
    m[0, 0, 4, 5] = True  # a second component of 1
    labels, counts = R.cpu_get_connected_components(m)
    assert labels.shape == counts.shape == m.shape
    assert labels.dtype == counts.dtype == torch.int32
    assert int(labels[0, 0, 0, 0]) == int(labels[0, 0, 2, 2]) != int(labels[0, 0, 4, 5]) > 0
    assert counts[0, 0, 0, 0] == 3 and counts[0, 0, 4, 5] == 1
    assert (labels[~m] == 0).all() and (counts[~m] == 0).all()
    assert (labels[1] == 0).all()


def test_fill_holes_works_on_cpu_without_warning(require_reference):
    R.install_cpu_connected_components()
    from sam2.utils.misc import fill_holes_in_mask_scores

    scores = torch.full((1, 1, 32, 32), 5.0)
    scores[0, 0, 10:12, 10:14] = -3.0  # hole of area 8 -> filled with 0.1
    scores[0, 0, 20:23, 20:23] = -3.0  # hole of area 9 -> kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fill_holes_in_mask_scores(scores, 8)
    assert (out[0, 0, 10:12, 10:14] == 0.1).all()
    assert (out[0, 0, 20:23, 20:23] == -3.0).all()
    assert (out[scores > 0] == 5.0).all()


def test_bf16_memory_works_in_memory_attention(ref_tiny21):
    """The reference fails on CPU when its memory is bf16 only; the oracle casts (a numeric no-op)."""
    model, _ = ref_tiny21
    g = torch.Generator().manual_seed(0)
    curr = torch.randn(4096, 1, 256, generator=g)
    curr_pos = torch.randn(4096, 1, 256, generator=g)
    memory = torch.randn(4096, 1, 64, generator=g).to(torch.bfloat16)
    memory_pos = torch.randn(4096, 1, 64, generator=g)
    with torch.no_grad():
        out_bf16 = model.memory_attention(curr, memory, curr_pos=curr_pos, memory_pos=memory_pos)
        out_f32 = model.memory_attention(
            curr, memory.float(), curr_pos=curr_pos, memory_pos=memory_pos)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, out_f32, rtol=0, atol=0)


def _conftest_copy():
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("_conftest_copy_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_reference_skips_or_fails(monkeypatch):
    mod = _conftest_copy()
    monkeypatch.setattr(mod, "_reference_import_error", lambda: "ImportError: no sam2")
    monkeypatch.delenv(mod.REQUIRE_REFERENCE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        mod._need_reference()
    monkeypatch.setenv(mod.REQUIRE_REFERENCE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="may not be skipped"):
        mod._need_reference()
    monkeypatch.setenv(mod.REQUIRE_REFERENCE_ENV, "0")
    with pytest.raises(pytest.skip.Exception):
        mod._need_reference()


@pytest.mark.skipif(os.environ.get("NAPARI_SAM2_REQUIRE_REFERENCE") != "1",
                    reason="only meaningful under NAPARI_SAM2_REQUIRE_REFERENCE=1 (CI)")
def test_reference_present_in_ci():
    import sam2  # noqa: F401
    import sam2.sam2_video_predictor  # noqa: F401
