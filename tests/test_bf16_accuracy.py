"""precision="bf16" gives the reference's fp32 masks: IoU >= 0.98 per object and frame, and the
same sign on >= 99.9 % of the pixels the reference is sure of (|logit| > 0.1).

The session is the full video parity session (3 objects, clicks with negatives, a box, a mask, a
refinement and re-propagation, reverse propagation, an object removed), run by the reference in fp32
and by ours in bf16 with its own bf16 image features. At a 256 input: bf16 arithmetic is emulated on
CPUs without AMX / AVX-512 BF16, where it is several times slower than fp32.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from napari_sam2 import build_video_predictor
from napari_sam2.predictor.frames import FrameSource

NAME = "sam2.1_hiera_tiny"
SIZE = 256
MIN_IOU = 0.98
MIN_SIGN_AGREEMENT = 0.999


class Bf16Session:
    def __init__(self, ref, ref_state, ours, our_state):
        self.ref, self.rs, self.ours, self.os = ref, ref_state, ours, our_state
        self.ious: list[float] = []
        self.agree = 0
        self.sure = 0

    def compare(self, a, b):
        ta, ids_a, ma = a
        tb, ids_b, mb = b
        assert ta == tb and list(ids_a) == list(ids_b)
        ma, mb = ma.float(), mb.float()
        for i, obj in enumerate(ids_a):
            fa, fb = ma[i] > 0, mb[i] > 0
            union = int((fa | fb).sum())
            iou = 1.0 if union == 0 else int((fa & fb).sum()) / union
            self.ious.append(iou)
            assert iou >= MIN_IOU, f"frame {ta}, object {obj}: mask IoU {iou:.4f} < {MIN_IOU} against fp32"
        sure = ma.abs() > 0.1
        self.sure += int(sure.sum())
        self.agree += int(((ma > 0) == (mb > 0))[sure].sum())

    def call(self, method, *args, **kwargs):
        a = getattr(self.ref, method)(self.rs, *args, **kwargs)
        b = getattr(self.ours, method)(self.os, *args, **kwargs)
        self.compare(a, b)

    def propagate(self, **kwargs):
        ra = list(self.ref.propagate_in_video(self.rs, **kwargs))
        ob = list(self.ours.propagate_in_video(self.os, **kwargs))
        assert [x[0] for x in ra] == [x[0] for x in ob]
        for a, b in zip(ra, ob):
            self.compare(a, b)


def test_bf16_session_agrees_with_the_fp32_reference(reference_ckpt_dir, require_reference, monkeypatch):
    from reference import build_reference, init_state_from_images, save_official_checkpoint
    from test_video_parity import _video

    ref = build_reference(NAME, seed=0, image_size=SIZE)
    ckpt = save_official_checkpoint(ref, reference_ckpt_dir / f"bf16_{SIZE}.pt")
    monkeypatch.delenv("NAPARI_SAM2_PRECISION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "bf16 will be slow" on CPUs without native bf16
        ours = build_video_predictor(NAME, checkpoint=ckpt, device="cpu", image_size=SIZE, precision="bf16")
    assert ours.precision == "bf16"
    assert ours.model.image_encoder.trunk.patch_embed.proj.weight.dtype == torch.bfloat16
    vid = _video(T=8)
    frames = FrameSource(vid, SIZE, normalize="reference")
    rs = init_state_from_images(ref, torch.stack([frames[t] for t in range(8)]), vid.shape[1], vid.shape[2])
    s = Bf16Session(ref, rs, ours, ours.init_state(vid, normalize="reference"))
    H, W = vid.shape[1:3]
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[40, 30]], labels=[1])
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[60, 40]], labels=[0], clear_old_points=False)
    s.call("add_new_points_or_box", frame_idx=0, obj_id=2, box=[80, 50, 100, 70])
    s.call("add_new_points_or_box", frame_idx=2, obj_id=3, points=[[30, 68], [50, 20]], labels=[1, 0])
    mask = np.zeros((H, W), bool)
    mask[40:70, 70:100] = True
    s.call("add_new_mask", frame_idx=5, obj_id=2, mask=mask)
    s.propagate()
    s.call("add_new_points_or_box", frame_idx=4, obj_id=1, points=[[52, 38]], labels=[1])
    s.propagate()
    s.propagate(start_frame_idx=4, reverse=True)
    s.ref.remove_object(s.rs, 3)
    s.ours.remove_object(s.os, 3)
    s.propagate()
    agreement = s.agree / s.sure
    print(f"\nbf16 vs fp32 reference ({SIZE} input, {len(s.ious)} object-frames): min IoU {min(s.ious):.4f}, "
          f"mean IoU {np.mean(s.ious):.4f}, sign agreement {agreement:.5f} on {s.sure} pixels with |logit| > 0.1")
    assert len(s.ious) >= 80
    assert agreement >= MIN_SIGN_AGREEMENT, f"sign agreement {agreement:.5f} < {MIN_SIGN_AGREEMENT}"
