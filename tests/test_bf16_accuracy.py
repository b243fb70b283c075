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
import pytest
import torch
from sessions import MaskAgreement, blob_video, full_session

from napari_sam2 import build_video_predictor
from napari_sam2.modeling import attention as attention_mod
from napari_sam2.predictor.frames import FrameSource

NAME = "sam2.1_hiera_tiny"
SIZE = 256
MIN_IOU = 0.98
MIN_SIGN_AGREEMENT = 0.999


@pytest.mark.parametrize("attention_path", ["torch kernel", "matmul"])
def test_bf16_session_agrees_with_the_fp32_reference(attention_path, reference_ckpt_dir, require_reference, monkeypatch):
    """Both ways bf16 attention runs, whatever this CPU would pick: torch's kernel (GPUs, AMX CPUs) and
    the two matrix products of CPUs with AVX-512 BF16 but no AMX (scores rounded to bf16)."""
    from reference import build_reference, init_state_from_images, save_official_checkpoint

    monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: attention_path == "matmul")

    ref = build_reference(NAME, seed=0, image_size=SIZE)
    ckpt = save_official_checkpoint(ref, reference_ckpt_dir / f"bf16_{SIZE}.pt")
    monkeypatch.delenv("NAPARI_SAM2_PRECISION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "bf16 will be slow" on CPUs without native bf16
        ours = build_video_predictor(NAME, checkpoint=ckpt, device="cpu", image_size=SIZE, precision="bf16")
    assert ours.precision == "bf16"
    assert ours.model.image_encoder.trunk.patch_embed.proj.weight.dtype == torch.bfloat16
    vid = blob_video(T=8)
    frames = FrameSource(vid, SIZE, normalize="reference")
    rs = init_state_from_images(ref, torch.stack([frames[t] for t in range(8)]), vid.shape[1], vid.shape[2])
    s = MaskAgreement(ref, rs, ours, ours.init_state(vid, normalize="reference"), min_iou=MIN_IOU)
    full_session(s, *vid.shape[1:3])
    print(f"\nbf16 ({attention_path} attention) vs fp32 reference ({SIZE} input, {len(s.ious)} object-frames): min IoU {min(s.ious):.4f}, "
          f"mean IoU {np.mean(s.ious):.4f}, sign agreement {s.sign_agreement:.5f} on {s.sure} pixels with |logit| > 0.1")
    assert len(s.ious) >= 80
    assert s.sign_agreement >= MIN_SIGN_AGREEMENT, f"sign agreement {s.sign_agreement:.5f} < {MIN_SIGN_AGREEMENT}"
