"""Numerical parity of our SAM2 network with the reference implementation ``sam2==1.1.0``.

Every test loads our model with ``build_model(name, checkpoint=<reference checkpoint>)`` (the real,
strict checkpoint-loading path) and feeds both networks the same inputs at fp32. Outputs must agree to
``TOL`` (max abs difference). Each comparison prints one line (visible with ``pytest -s``) and is
recorded in ``parity_report``, which prints the worst figure per component at the end of the session.

Where the image encoder is not under test, inputs are random features of the right shapes (the encoder
costs seconds per 1024² frame on a CPU).

Presence: the reference oracle adds +2 to the object-score head's bias, so objects are present (score
> 0) whatever the input: with random weights the score hardly depends on the input (+-0.1). To exercise
the "object absent" paths (masks set to -1024, ``no_obj_ptr``, ``no_obj_embed_spatial``), the tests
shift that bias by the same amount in both networks (:func:`shifted_obj_score_bias`): in the
SAM-heads test so that, in one batch, one object is present and the other absent; in the tracking test
for one "occluded" frame. An empty mask prompt is a second, input-driven way to an absent object.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import parity_report
import pytest
import torch
import torch.nn.functional as F

from napari_sam2.build import build_model
from napari_sam2.modeling.sam2 import FrameFeatures

TOL = 1e-4  # max abs difference allowed on every compared output (fp32)
PRESENCE_MARGIN = 1e-3  # |object score| must exceed this for a presence decision to be comparable

ALL_NAMES = tuple(f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("tiny", "small", "base_plus", "large"))
# official key counts (SAM2_FACTS.md): sam2 / sam2.1
KEY_COUNTS = {
    "sam2_hiera_tiny": 468, "sam2.1_hiera_tiny": 471,
    "sam2_hiera_small": 516, "sam2.1_hiera_small": 519,
    "sam2_hiera_base_plus": 612, "sam2.1_hiera_base_plus": 615,
    "sam2_hiera_large": 900, "sam2.1_hiera_large": 903,
}
TINY21, TINY20 = "sam2.1_hiera_tiny", "sam2_hiera_tiny"
IMG = 1024
SEQ = 512  # input size of the tracking sequences (section 6)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _parity_report_plugin(request):
    parity_report.register(request.config)


def compare(component: str, ref: torch.Tensor, ours: torch.Tensor, where: str, tol: float = TOL) -> float:
    """Assert max |ref - ours| <= tol; print and record the figure."""
    assert isinstance(ours, torch.Tensor), f"{where} {component}: ours is {type(ours).__name__}"
    assert tuple(ref.shape) == tuple(ours.shape), (
        f"{where} {component}: shape ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    )
    a, b = ref.detach().float(), ours.detach().float()
    assert torch.isfinite(a).all(), f"{where} {component}: reference output not finite"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not torch.isfinite(b).all():
        err = float("nan")
    scale = a.abs().max().item() if a.numel() else 0.0
    print(f"  {where:<34s} {component:<32s} max|diff| {err:.2e}   max|ref| {scale:.3g}")
    parity_report.record(component, err, tol, scale, where)
    assert err <= tol, f"{where} {component}: max |ours - reference| = {err:.3e} > {tol:.0e} (max|ref| {scale:.3g})"
    return err


def _obj_score_bias_name(ref) -> str:
    """State-dict name of the last bias of the object-score head (same name in both networks)."""
    head = ref.sam_mask_decoder.pred_obj_score_head
    bias = head.layers[-1].bias if hasattr(head, "layers") else head.bias
    return next(n for n, p in ref.named_parameters() if p is bias)


@contextmanager
def shifted_obj_score_bias(ref, ours, delta: float):
    """Add ``delta`` to the object-score head's output bias of both networks; restore exactly after."""
    name = _obj_score_bias_name(ref)
    params = [dict(m.named_parameters())[name] for m in (ref, ours)]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(delta)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def ref_layout(f: FrameFeatures):
    """Our FrameFeatures -> the reference's (HW)BC lists ``current_vision_feats``, ``..._pos_embeds``."""
    flat = lambda t: t.flatten(2).permute(2, 0, 1)  # noqa: E731
    feats = [flat(f.high_res[0]), flat(f.high_res[1]), flat(f.embed)]
    pos = [None, None, flat(f.pos)]
    sizes = [tuple(f.high_res[0].shape[-2:]), tuple(f.high_res[1].shape[-2:]), tuple(f.embed.shape[-2:])]
    return feats, pos, sizes


def random_frame(ref, g: torch.Generator, b: int = 1, grid: int = 64) -> FrameFeatures:
    """Random image features of one frame (shared by ``b`` objects), with the real sine position map;
    ``grid`` x ``grid`` tokens (64: a 1024 input, 32: 512)."""
    embed = torch.randn(1, 256, grid, grid, generator=g)
    high_res = (torch.randn(1, 32, 4 * grid, 4 * grid, generator=g), torch.randn(1, 64, 2 * grid, 2 * grid, generator=g))
    with torch.inference_mode():
        pos = ref.image_encoder.neck.position_encoding(embed)
    return FrameFeatures(embed, pos, high_res).expand(b)


def points(coords, labels) -> dict:
    """B x N clicks: coords [[x, y], ...] per object, labels per object."""
    return {
        "point_coords": torch.tensor(coords, dtype=torch.float32),
        "point_labels": torch.tensor(labels, dtype=torch.int32),
    }


def disk(cx: float, cy: float, r: float, size: int = IMG) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()


# --------------------------------------------------------------------------------------------------
# fixtures: our model built from the reference's checkpoint, forward_image outputs of both
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(reference_factory):
    """``pair(name, image_size=1024) -> (reference, ours)``; ours loaded from the reference's checkpoint."""
    cache = {}

    def get(name: str, image_size: int = IMG):
        key = (name, image_size)
        if key not in cache:
            ref, ckpt = reference_factory(name, 0, None if image_size == IMG else image_size)
            cache[key] = (ref, build_model(name, checkpoint=ckpt, image_size=image_size))
        return cache[key]

    yield get
    cache.clear()
    gc.collect()


@pytest.fixture(scope="module")
def encoded(pair):
    """``encoded(name) -> (reference forward_image output, ours)`` on one seeded random image."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ref, ours = pair(name)
            x = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                cache[name] = (ref.forward_image(x), ours.forward_image(x))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------------
# 1. strict checkpoint loading, all eight configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_strict_load_all_configs(name, require_reference, reference_factory, tmp_path):
    """build_model(name, checkpoint=<reference file>) loads every tensor of the file, bit for bit."""
    if name in (TINY21, TINY20):
        _, ckpt = reference_factory(name, 0)  # session-cached, shared with the other tests
    else:  # large models: build, save, free (not kept in the session cache)
        from reference import build_reference, save_official_checkpoint

        ref = build_reference(name, 0)
        ckpt = save_official_checkpoint(ref, tmp_path / f"{name}.pt")
        del ref
        gc.collect()
    ours = build_model(name, checkpoint=ckpt)
    assert not ours.training
    file_sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    own = ours.state_dict()
    assert len(file_sd) == KEY_COUNTS[name], f"reference file has {len(file_sd)} keys"
    assert sorted(own) == sorted(file_sd), (
        f"missing {sorted(set(file_sd) - set(own))[:5]}, extra {sorted(set(own) - set(file_sd))[:5]}"
    )
    bad = [
        k for k, v in file_sd.items()
        if own[k].dtype != v.dtype or own[k].shape != v.shape or not torch.equal(own[k], v)
    ]
    assert bad == [], f"{len(bad)} tensors differ from the file, e.g. {bad[:5]}"
    print(f"  {name}: {len(own)} tensors equal to the file's")
    del ours, own, file_sd
    if name not in (TINY21, TINY20):
        ckpt.unlink()
    gc.collect()


# --------------------------------------------------------------------------------------------------
# 2. image encoder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY21, TINY20])
def test_forward_image(name, require_reference, encoded):
    ref_out, our_out = encoded(name)
    where = f"forward_image {name}"
    assert len(our_out["backbone_fpn"]) == len(ref_out["backbone_fpn"]) == 3
    assert len(our_out["vision_pos_enc"]) == len(ref_out["vision_pos_enc"]) == 3
    for i, (a, b) in enumerate(zip(ref_out["backbone_fpn"], our_out["backbone_fpn"])):
        compare(f"forward_image/backbone_fpn[{i}]", a, b, where)
    for i, (a, b) in enumerate(zip(ref_out["vision_pos_enc"], our_out["vision_pos_enc"])):
        compare(f"forward_image/vision_pos_enc[{i}]", a, b, where)
    compare("forward_image/vision_features", ref_out["vision_features"], our_out["vision_features"], where)


# --------------------------------------------------------------------------------------------------
# 3. prompt encoder + mask decoder
# --------------------------------------------------------------------------------------------------

SAM_OUTPUTS = ("multimasks", "multimasks_high_res", "ious", "pred_masks", "pred_masks_high_res", "obj_ptr",
               "object_score_logits")


def test_sam_heads(require_reference, pair, encoded):
    ref, ours = pair(TINY21)
    ref_out, _ = encoded(TINY21)
    with torch.inference_mode():
        _, vf, _, sizes = ref._prepare_backbone_features(ref_out)
        high_res = [v.permute(1, 2, 0).reshape(v.shape[1], v.shape[2], *s) for v, s in zip(vf[:-1], sizes[:-1])]
        # as SAM2ImagePredictor does: the lowest-resolution level plus no_mem_embed
        pix = (vf[-1] + ref.no_mem_embed).permute(1, 2, 0).reshape(1, 256, *sizes[-1])

    g = torch.Generator().manual_seed(3)
    mask_logits = F.interpolate(torch.randn(1, 1, 32, 32, generator=g) * 8, size=(256, 256), mode="bilinear")
    # name -> (B, point_inputs, mask_inputs, multimask_output)
    cases = {
        "click": (1, points([[[500.0, 300.0]]], [[1]]), None, True),
        "click2": (1, points([[[100.0, 900.0]]], [[1]]), None, True),
        "clicks+negative": (1, points([[[500.0, 300.0], [200.0, 700.0]]], [[1, 0]]), None, False),
        "box": (1, points([[[100.0, 200.0], [600.0, 700.0]]], [[2, 3]]), None, False),
        "box+clicks": (1, points([[[100.0, 200.0], [600.0, 700.0], [300.0, 400.0], [550.0, 650.0]]],
                                 [[2, 3, 1, 0]]), None, False),
        "mask": (1, None, mask_logits, False),
        "mask+click": (1, points([[[500.0, 300.0]]], [[1]]), mask_logits, True),
        "batch2 click/click (multimask)": (2, points([[[500.0, 300.0]], [[800.0, 120.0]]], [[1], [1]]), None, True),
        # one object: a click padded with label -1; the other: a box
        "batch2 click/box (mixed)": (2, points([[[800.0, 120.0], [0.0, 0.0]], [[300.0, 100.0], [900.0, 500.0]]],
                                               [[1, -1], [2, 3]]), None, False),
    }

    def run(model_is_ref: bool, b, pts, mask, multi):
        emb, hr = pix.expand(b, -1, -1, -1), [h.expand(b, -1, -1, -1) for h in high_res]
        if mask is not None:
            mask = mask.expand(b, -1, -1, -1)
        with torch.inference_mode():
            if model_is_ref:
                out = ref._forward_sam_heads(emb, point_inputs=pts, mask_inputs=mask, high_res_features=hr,
                                             multimask_output=multi)
                return dict(zip(SAM_OUTPUTS, out))
            return ours.sam_heads(emb, tuple(hr), pts, mask, multi)

    # place the presence threshold between the two objects of the mixed batch
    scores = run(True, *cases["batch2 click/box (mixed)"])["object_score_logits"].flatten()
    assert (scores[0] - scores[1]).abs() > 2 * PRESENCE_MARGIN, f"mixed-batch scores too close: {scores.tolist()}"
    shift = -float(scores.mean())

    presence = []
    with shifted_obj_score_bias(ref, ours, shift):
        for case, (b, pts, mask, multi) in cases.items():
            r, o = run(True, b, pts, mask, multi), run(False, b, pts, mask, multi)
            where = f"sam_heads {case}"
            for k in SAM_OUTPUTS:
                compare(f"sam_heads/{k}", r[k], o[k], where)
            score = r["object_score_logits"].flatten()
            assert score.abs().min() > PRESENCE_MARGIN, f"{where}: presence too close to call: {score.tolist()}"
            present = (score > 0).tolist()
            presence += present
            for i, p in enumerate(present):
                lo = r["pred_masks"][i]
                if p:  # a real mask, not the -1024 fill: the comparison means something
                    assert (lo > -1000).all() and lo.std() > 1e-3, f"{where}: object {i} present but mask flat"
                else:
                    assert (lo == -1024).all() and (o["pred_masks"][i] == -1024).all()
                    compare("sam_heads/obj_ptr(absent)", ref.no_obj_ptr[0], o["obj_ptr"][i], where)
            if multi:  # which of the three masks is best
                best_r, best_o = r["ious"].argmax(-1), o["ious"].argmax(-1)
                top2 = r["ious"].topk(2, dim=-1).values
                assert ((top2[:, 0] - top2[:, 1]) > 10 * TOL).all(), f"{where}: IoU tie, choice ill-defined"
                assert torch.equal(best_r, best_o), f"{where}: best mask ref {best_r.tolist()} ours {best_o.tolist()}"
                rows = torch.arange(b)
                assert torch.equal(o["pred_masks"][:, 0], o["multimasks"][rows, best_o])
                print(f"  {where:<34s} best mask index {best_o.tolist()}")
            print(f"  {where:<34s} object score {score.tolist()} present {present}")
            if case == "batch2 click/box (mixed)":
                assert present == [True, False] or present == [False, True], present
    assert any(presence) and not all(presence), f"need present and absent objects, got {presence}"


# --------------------------------------------------------------------------------------------------
# 4. memory encoder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY21, TINY20])
def test_memory_encoder(name, require_reference, pair):
    ref, ours = pair(name)
    g = torch.Generator().manual_seed(4)
    feats = random_frame(ref, g, b=2)
    vf, _, sizes = ref_layout(feats)
    # object 0: present, smooth mixed-sign logits; object 1: absent (-1024 everywhere, as sam_heads gives)
    present = F.interpolate(torch.randn(1, 1, 64, 64, generator=g) * 6, size=(IMG, IMG), mode="bilinear")
    masks = torch.cat([present, torch.full((1, 1, IMG, IMG), -1024.0)])
    obj_scores = torch.tensor([[1.5], [-0.5]])
    outs = {}
    for from_pts in (True, False):  # True: binarised mask (clicks), False: sigmoid
        where = f"encode_memory {name} pts={from_pts}"
        with torch.inference_mode():
            r_feat, r_pos = ref._encode_new_memory(vf, sizes, masks.clone(), obj_scores, from_pts)
            o_feat = ours.encode_memory(feats, masks.clone(), obj_scores, from_pts)
            mask_in = (masks > 0).float() if from_pts else torch.sigmoid(masks)
            _, o_pos = ours.memory_encoder(feats.embed, mask_in * 20.0 - 10.0)
        compare("memory_encoder/maskmem_features", r_feat, o_feat, where)
        compare("memory_encoder/maskmem_pos_enc", r_pos[-1], o_pos, where)
        outs[from_pts] = o_feat
    # the flag matters (else the test could not tell binarised from sigmoid inputs)
    assert (outs[True][0] - outs[False][0]).abs().max() > 1e-2
    if name == TINY21:  # the absent object carries no_obj_embed_spatial
        assert ours.no_obj_embed_spatial is not None and ref.no_obj_embed_spatial is not None
    else:
        assert ours.no_obj_embed_spatial is None and ref.no_obj_embed_spatial is None


# --------------------------------------------------------------------------------------------------
# 5. memory attention, full memory bank
# --------------------------------------------------------------------------------------------------


def _bank_entry(ref, g, b, grid=64):
    mem = torch.randn(b, 64, grid, grid, generator=g).to(torch.bfloat16)  # stored in bf16, like the predictor
    with torch.inference_mode():
        mem_pos = ref.memory_encoder.position_encoding(mem).float()
    return {"maskmem_features": mem, "maskmem_pos_enc": [mem_pos], "obj_ptr": torch.randn(b, 256, generator=g)}


@pytest.mark.parametrize(
    "name,reverse,b,grid",
    # one at the official 64 x 64 grid (28.7k memory tokens); the bank's frames, order and encodings do
    # not depend on the grid, and a 32 x 32 one costs 16x less attention
    [(TINY21, False, 2, 32), (TINY21, True, 1, 64), (TINY20, False, 1, 32), (TINY20, True, 1, 32)],
    ids=["sam2.1-forward-2obj", "sam2.1-reverse", "sam2-forward", "sam2-reverse"],
)
def test_memory_attention_full_bank(name, reverse, b, grid, require_reference, pair):
    ref, ours = pair(name)
    g = torch.Generator().manual_seed(5)
    num_frames = 30
    sign = -1 if reverse else 1  # direction of "the past"
    frame = 10 if reverse else 20
    cond_frames = (28, 3) if reverse else (2, 26)  # one in the past, one in the future
    past = [frame - sign * d for d in range(1, 16)]  # 15 preceding frames: 6 memories, 15 pointers
    ignored = [frame - sign * 17, frame + sign * 2]  # too far back / in the future: must not be used
    bank = {
        "cond_frame_outputs": {t: _bank_entry(ref, g, b, grid) for t in cond_frames},
        "non_cond_frame_outputs": {t: _bank_entry(ref, g, b, grid) for t in past + ignored},
    }
    feats = random_frame(ref, g, b, grid)
    vf, vp, sizes = ref_layout(feats)
    with torch.inference_mode():
        r = ref._prepare_memory_conditioned_features(
            frame_idx=frame, is_init_cond_frame=False, current_vision_feats=vf[-1:],
            current_vision_pos_embeds=vp[-1:], feat_sizes=sizes[-1:], output_dict=bank,
            num_frames=num_frames, track_in_reverse=reverse,
        )
        o = ours.condition_on_memory(feats, frame, bank, num_frames, reverse=reverse)
    compare("memory_attention/pix_feat_with_mem", r, o, f"condition_on_memory {name} rev={reverse} B={b}")
    # memory attention did change the features (the bank is not ignored)
    assert (o - feats.embed).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# 6. tracking sequences through track_step
# --------------------------------------------------------------------------------------------------

STEP_OUTPUTS = ("pred_masks", "pred_masks_high_res", "obj_ptr", "object_score_logits", "maskmem_features")


class Tracker:
    """Runs the same track_step on both networks; each keeps its own output dicts (memory bank)."""

    def __init__(self, ref, ours, num_frames: int, reverse: bool = False):
        self.ref, self.ours, self.num_frames, self.reverse = ref, ours, num_frames, reverse
        self.ref_bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        self.our_bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        self.scores: list[tuple[str, list[float]]] = []

    def step(self, feats: FrameFeatures, t: int, label: str, *, init_cond=False, point_inputs=None,
             mask_inputs=None, correction=False):
        prev_r = prev_o = None
        if correction:  # previous low-res logits of this frame fed back with the new clicks
            prev_r = self.ref_bank["non_cond_frame_outputs"][t]["pred_masks"].clamp(-32.0, 32.0)
            prev_o = self.our_bank["non_cond_frame_outputs"][t]["pred_masks"].clamp(-32.0, 32.0)
        vf, vp, sizes = ref_layout(feats)
        with torch.inference_mode():
            r = self.ref.track_step(
                frame_idx=t, is_init_cond_frame=init_cond, current_vision_feats=vf,
                current_vision_pos_embeds=vp, feat_sizes=sizes, point_inputs=point_inputs,
                mask_inputs=mask_inputs, output_dict=self.ref_bank, num_frames=self.num_frames,
                track_in_reverse=self.reverse, run_mem_encoder=True, prev_sam_mask_logits=prev_r,
            )
            o = self.ours.track_step(
                feats, t, init_cond, memory=self.our_bank, num_frames=self.num_frames,
                point_inputs=point_inputs, mask_inputs=mask_inputs, reverse=self.reverse,
                run_mem_encoder=True, prev_mask_logits=prev_o,
            )
        where = f"t={t} {label}"
        for k in STEP_OUTPUTS:
            compare(f"track_step/{k}", r[k], o[k], where)
        score = r["object_score_logits"].flatten()
        assert score.abs().min() > PRESENCE_MARGIN, f"{where}: presence too close to call: {score.tolist()}"
        self.scores.append((where, score.tolist()))
        key = "cond_frame_outputs" if init_cond else "non_cond_frame_outputs"
        self.ref_bank[key][t], self.our_bank[key][t] = r, o
        return r, o


def test_track_sequence_forward(require_reference, pair):
    """8 frames, 2 objects: clicks on frame 0, a mask prompt on frame 2 (object 1's mask is empty: absent),
    propagation, an occluded frame (both objects absent), a correction with clicks + previous logits.
    At a 512 input (SEQ): every step's arithmetic is the 1024 one's on a 32 x 32 grid, 10x cheaper."""
    ref, ours = pair(TINY21, SEQ)
    g = torch.Generator().manual_seed(6)
    num_frames = 8
    frames = [random_frame(ref, g, b=2, grid=SEQ // 16) for _ in range(num_frames)]
    tr = Tracker(ref, ours, num_frames)
    tr.step(frames[0], 0, "cond clicks", init_cond=True,
            point_inputs=points([[[250.0, 150.0]], [[50.0, 450.0]]], [[1], [1]]))
    masks = torch.stack([disk(300.0, 200.0, 75.0, SEQ), torch.zeros(SEQ, SEQ)])[:, None]
    r, o = tr.step(frames[2], 2, "cond mask", init_cond=True, mask_inputs=masks)
    assert r["object_score_logits"].flatten().tolist() == [10.0, -10.0]  # the empty mask: absent
    for t in (1, 3, 4):
        tr.step(frames[t], t, "propagate")
    with shifted_obj_score_bias(ref, ours, -4.0):  # an occluded frame
        r, o = tr.step(frames[5], 5, "propagate, occluded")
    assert (r["object_score_logits"] <= 0).all()
    assert (r["pred_masks"] == -1024).all() and (o["pred_masks"] == -1024).all()
    r, _ = tr.step(frames[6], 6, "propagate")
    assert (r["object_score_logits"] > 0).all(), "objects come back after the occlusion"
    tr.step(frames[6], 6, "correction", correction=True,
            point_inputs=points([[[305.0, 210.0], [25.0, 25.0]], [[150.0, 150.0], [350.0, 350.0]]],
                                [[1, 0], [1, 0]]))
    tr.step(frames[7], 7, "propagate (7 memories)")
    present = [s > 0 for _, scores in tr.scores for s in scores]
    assert any(present) and not all(present)
    for where, scores in tr.scores:
        print(f"  {where:<34s} object scores {[f'{s:.3f}' for s in scores]}")


def test_track_sequence_reverse(require_reference, pair):
    """A box on frame 7 of 8, tracked back to frame 3 (track_in_reverse). One object, and not down to
    frame 0, to save time: a full bank in reverse is covered by test_memory_attention_full_bank."""
    ref, ours = pair(TINY21, SEQ)
    g = torch.Generator().manual_seed(7)
    num_frames = 8
    frames = [random_frame(ref, g, b=1, grid=SEQ // 16) for _ in range(num_frames)]
    tr = Tracker(ref, ours, num_frames, reverse=True)
    tr.step(frames[7], 7, "cond box", init_cond=True, point_inputs=points([[[150.0, 125.0], [350.0, 400.0]]], [[2, 3]]))
    for t in range(6, 2, -1):
        tr.step(frames[t], t, "propagate reverse")
    assert sorted(tr.ref_bank["non_cond_frame_outputs"]) == [3, 4, 5, 6]
