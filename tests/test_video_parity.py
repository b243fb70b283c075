"""The video predictor behaves exactly like the reference SAM2VideoPredictor (sam2==1.1.0).

Same random-weight checkpoint, same frames, same session of prompts through both; every returned
mask is compared. The full session runs at a 512 input (every module adapts to it, and a step costs
~10x less on CPU); a shorter session runs at the official 1024.
Frames are encoded once and shared: the image encoder's parity is proven in test_parity_model.py.
"""

from __future__ import annotations

import hashlib

import torch
from sessions import LogitParity, blob_video, full_session

from napari_sam2 import build_video_predictor
from napari_sam2.predictor.frames import FrameSource

NAME = "sam2.1_hiera_tiny"
TOL = 1e-4


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


def _session(ckpt_dir, image_size, T, seed_video=0):
    from reference import build_reference, init_state_from_images, save_official_checkpoint

    ref = build_reference(NAME, seed=0, image_size=image_size)
    ckpt = save_official_checkpoint(ref, ckpt_dir / f"video_{image_size}.pt")
    ours = build_video_predictor(NAME, checkpoint=ckpt, device="cpu", image_size=image_size)
    _share_encoder(ref, ours)
    vid = blob_video(T=T, seed=seed_video)
    frames = FrameSource(vid, image_size, normalize="reference")
    images = torch.stack([frames[t] for t in range(T)])
    rs = init_state_from_images(ref, images, vid.shape[1], vid.shape[2])
    os_ = ours.init_state(vid, normalize="reference")
    return LogitParity(ref, rs, ours, os_, tol=TOL), vid


def test_full_session_matches_reference(reference_ckpt_dir, require_reference):
    """3 objects; clicks with negatives on two frames, a box, a mask on a later frame; forward
    propagation; a refinement click and re-propagation; reverse propagation from a middle frame;
    an object removed and propagation again."""
    s, vid = _session(reference_ckpt_dir, image_size=512, T=8)
    full_session(s, *vid.shape[1:3])
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
