"""The video predictor behaves exactly like the reference SAM2VideoPredictor (sam2==1.1.0).

Same random-weight checkpoint, same frames, same session of prompts through both; every returned
mask is compared. The full session runs at a 512 input (every module adapts to it, and a step costs
~10x less on CPU); a shorter session runs at the official 1024.
Frames are encoded once and shared: the image encoder's parity is proven in test_parity_model.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from napari_sam2 import build_video_predictor
from napari_sam2.predictor.frames import FrameSource

NAME = "sam2.1_hiera_tiny"
TOL = 1e-4


def _video(T=8, H=96, W=128, seed=0) -> np.ndarray:
    """8-bit RGB frames with three moving blobs."""
    yy, xx = np.mgrid[:H, :W]
    rng = np.random.default_rng(seed)
    vid = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        img = 30 + 10 * rng.random((H, W))
        for cy, cx, r in [(30 + 2 * t, 40 + 3 * t, 12), (60, 90 - 2 * t, 10), (70 - t, 30, 8)]:
            img += 150 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        vid[t] = np.clip(np.stack([img, img * 0.8, img * 0.6], -1), 0, 255).astype(np.uint8)
    return vid


def _share_encoder(ref, ours):
    """Encode each distinct frame once for both models (keyed by the preprocessed pixels)."""
    memo: dict[str, dict] = {}
    hits = {"n": 0}

    def wrap(fn):
        def forward_image(img):
            key = hashlib.sha1(img.detach().cpu().numpy().tobytes()).hexdigest()
            if key in memo:
                hits["n"] += 1
            else:
                memo[key] = fn(img)
            o = memo[key]
            return {"vision_features": o["vision_features"], "vision_pos_enc": list(o["vision_pos_enc"]), "backbone_fpn": list(o["backbone_fpn"])}

        return forward_image

    ref.forward_image = wrap(ref.forward_image)
    ours.model.forward_image = wrap(ours.model.forward_image)
    return memo


class Session:
    """Runs the same calls on the reference and on ours, comparing every output."""

    def __init__(self, ref, ref_state, ours, our_state):
        self.ref, self.rs, self.ours, self.os = ref, ref_state, ours, our_state
        self.worst = 0.0
        self.compared = 0
        self.pixels = 0

    def compare(self, a, b):
        ta, ids_a, ma = a
        tb, ids_b, mb = b
        assert ta == tb
        assert list(ids_a) == list(ids_b)
        assert ma.shape == mb.shape
        diff = (ma - mb).abs().max().item()
        self.worst = max(self.worst, diff)
        confident = ma.abs() > 0.01
        disagree = ((ma > 0) != (mb > 0)) & confident
        assert int(disagree.sum()) == 0, f"frame {ta}: {int(disagree.sum())} pixels disagree in sign"
        assert diff <= TOL, f"frame {ta}: max |logit difference| {diff:.3e} > {TOL}"
        self.compared += 1
        self.pixels += int(confident.sum())

    def call(self, method, *args, **kwargs):
        a = getattr(self.ref, method)(self.rs, *args, **kwargs)
        b = getattr(self.ours, method)(self.os, *args, **kwargs)
        self.compare(a, b)
        return b

    def propagate(self, **kwargs):
        ra = list(self.ref.propagate_in_video(self.rs, **kwargs))
        ob = list(self.ours.propagate_in_video(self.os, **kwargs))
        assert [x[0] for x in ra] == [x[0] for x in ob]
        for a, b in zip(ra, ob):
            self.compare(a, b)
        return ob


def _session(ckpt_dir, image_size, T, seed_video=0):
    from reference import build_reference, init_state_from_images, save_official_checkpoint

    ref = build_reference(NAME, seed=0, image_size=image_size)
    ckpt = save_official_checkpoint(ref, ckpt_dir / f"video_{image_size}.pt")
    ours = build_video_predictor(NAME, checkpoint=ckpt, device="cpu", image_size=image_size)
    _share_encoder(ref, ours)
    vid = _video(T=T, seed=seed_video)
    frames = FrameSource(vid, image_size, normalize="reference")
    images = torch.stack([frames[t] for t in range(T)])
    rs = init_state_from_images(ref, images, vid.shape[1], vid.shape[2])
    os_ = ours.init_state(vid, normalize="reference")
    return Session(ref, rs, ours, os_), vid


def test_full_session_matches_reference(reference_ckpt_dir, require_reference):
    """3 objects; clicks with negatives on two frames, a box, a mask on a later frame; forward
    propagation; a refinement click and re-propagation; reverse propagation from a middle frame;
    an object removed and propagation again."""
    s, vid = _session(reference_ckpt_dir, image_size=512, T=8)
    H, W = vid.shape[1:3]
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[40, 30]], labels=[1])
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[60, 40]], labels=[0], clear_old_points=False)
    s.call("add_new_points_or_box", frame_idx=0, obj_id=2, box=[80, 50, 100, 70])
    s.call("add_new_points_or_box", frame_idx=2, obj_id=3, points=[[30, 68], [50, 20]], labels=[1, 0])
    mask = np.zeros((H, W), bool)
    mask[40:70, 70:100] = True
    s.call("add_new_mask", frame_idx=5, obj_id=2, mask=mask)
    out = s.propagate()
    assert [t for t, _, _ in out] == list(range(8))
    s.call("add_new_points_or_box", frame_idx=4, obj_id=1, points=[[52, 38]], labels=[1])
    s.propagate()
    rev = s.propagate(start_frame_idx=4, reverse=True)
    assert [t for t, _, _ in rev] == [4, 3, 2, 1, 0]
    ids_ref, _ = s.ref.remove_object(s.rs, 3)
    ids_ours, _ = s.ours.remove_object(s.os, 3)
    assert list(ids_ref) == list(ids_ours) == [1, 2]
    s.propagate()
    print(f"\nvideo parity (512 input, 3 objects, {s.compared} outputs): max |logit diff| {s.worst:.2e}, "
          f"sign agreement on {s.pixels} confident pixels")
    assert s.compared >= 35


def test_session_at_official_size_matches_reference(reference_ckpt_dir, require_reference):
    """At 1024: two objects, a click and a box, forward propagation over 3 frames, a correction."""
    s, vid = _session(reference_ckpt_dir, image_size=1024, T=3)
    s.call("add_new_points_or_box", frame_idx=0, obj_id=7, points=[[40, 30], [60, 40]], labels=[1, 0])
    s.call("add_new_points_or_box", frame_idx=1, obj_id=9, box=[80, 50, 100, 70])
    s.propagate()
    s.call("add_new_points_or_box", frame_idx=2, obj_id=7, points=[[45, 35]], labels=[1])
    s.propagate(start_frame_idx=2, reverse=True, max_frame_num_to_track=1)
    print(f"\nvideo parity (1024 input, 2 objects, {s.compared} outputs): max |logit diff| {s.worst:.2e}")
