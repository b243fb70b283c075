#!/usr/bin/env python
"""The GPU check, in one run: CUDA parity in fp32 and bf16, then frames per second, ours beside the reference.

1. parity: the full video parity session (3 objects, clicks, a box, a mask, refinement, reverse
   propagation, an object removed; tests/sessions.py) at the official 1024 input through the reference
   (fp32, TF32 off) and through ours in fp32 (logits within 1e-3, same sign where |logit| > 0.01) and in
   bf16 (mask IoU >= 0.98 per object and frame, sign agreement >= 99.9 % where |logit| > 0.1).
2. speed: ``propagate_in_video`` over a synthetic 16-bit time-lapse, 1 and 10 objects (one click each
   on frame 0), for each model, eager and with ``torch.compile`` of the image encoder (both
   implementations). Ours runs precision="auto" (bf16 on GPUs of compute capability >= 8) without the
   feature cache (each frame encoded once in the pass, as the reference does); the reference runs under
   ``torch.autocast("cuda", torch.bfloat16)`` as its README says to, TF32 on. Frames per second and
   object-frames per second after a warm-up pass.

Random weights in the official layout (no checkpoint can be downloaded); the same file for both.

Usage: benchmarks/gpu_check.sh (installs what is missing), or
    PYTHONPATH=src:tests python benchmarks/gpu_check.py [--device cuda] [--models ...] [--objects 1 10]
A CPU dry run of the script itself: --device cpu --size 256 --frames 4 --no-compile --models sam2.1_hiera_tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(device, size: int, tmp: Path) -> bool:
    from reference import build_reference, init_state_from_images, save_official_checkpoint
    from sessions import LogitParity, MaskAgreement, blob_video, full_session

    from napari_sam2.predictor.frames import FrameSource
    from napari_sam2.predictor.video import build_video_predictor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = "sam2.1_hiera_tiny"
    ref = build_reference(name, 0, image_size=size)
    ckpt = save_official_checkpoint(ref, tmp / "parity.pt")
    ref = ref.to(device)
    vid = blob_video(T=8)
    H, W = vid.shape[1:3]
    frames = FrameSource(vid, size, normalize="reference")
    images = torch.stack([frames[t] for t in range(8)])
    ok = True
    for precision in ("fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ours = build_video_predictor(name, checkpoint=ckpt, device=device, image_size=size, precision=precision,
                                         feature_cache=False)
        rs = init_state_from_images(ref, images.to(device), H, W)
        state = ours.init_state(vid, normalize="reference")
        if precision == "fp32":
            s = LogitParity(ref, rs, ours, state, tol=1e-3)
        else:
            s = MaskAgreement(ref, rs, ours, state, min_iou=0.98)
        try:
            with torch.inference_mode():
                full_session(s, H, W)
            if precision == "fp32":
                verdict = f"max |logit diff| {s.worst:.2e} over {s.compared} outputs (<= 1e-3): PASS"
            else:
                agree = s.sign_agreement
                passed = agree >= 0.999
                ok &= passed
                verdict = (f"min IoU {min(s.ious):.4f} over {len(s.ious)} object-frames (>= 0.98), sign agreement "
                           f"{agree:.5f} (>= 0.999): {'PASS' if passed else 'FAIL'}")
        except AssertionError as exc:
            ok = False
            verdict = f"FAIL: {exc}"
        print(f"parity {precision} on {device} at {size}: {verdict}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ok


def one_speed(device, name: str, size: int, n_objects: int, compiled: bool, n_frames: int, tmp: Path):
    """(ours fps, reference fps, compile seconds, ours' precision)."""
    from reference import build_reference, init_state_from_images, save_official_checkpoint

    from napari_sam2.predictor.frames import FrameSource
    from napari_sam2.predictor.video import build_video_predictor
    from napari_sam2.synthetic import make_timelapse

    ref = build_reference(name, 0, image_size=size)
    ckpt = save_official_checkpoint(ref, tmp / f"{name}.pt")
    ref = ref.to(device)
    ours = build_video_predictor(name, checkpoint=ckpt, device=device, image_size=size, precision="auto",
                                 feature_cache=False)
    ts = make_timelapse(n_frames=n_frames, shape=(512, 512), n_cells=n_objects, divide=False, enter=False, seed=0)
    rows = ts.positions[ts.positions.frame == 0].sort_values("label").head(n_objects)
    clicks = [(int(r.label), np.array([[r.x, r.y]], np.float32)) for r in rows.itertuples()]
    video = ts.image
    frames = FrameSource(video, size)
    images = torch.stack([frames[t] for t in range(n_frames)]).to(device)
    H, W = video.shape[1:]
    if compiled:
        ours.model.image_encoder = torch.compile(ours.model.image_encoder)
        ref.image_encoder = torch.compile(ref.image_encoder)

    def ours_pass(limit):
        state = ours.init_state(video)
        for label, pt in clicks:
            ours.add_new_points_or_box(state, 0, label, points=pt, labels=np.array([1], np.int32))
        sync(device)
        t0 = time.perf_counter()
        n = sum(1 for _ in ours.propagate_in_video(state, max_frame_num_to_track=limit))
        sync(device)
        ours.close(state)
        return n / (time.perf_counter() - t0)

    def ref_pass(limit):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            state = init_state_from_images(ref, images, H, W)
            for label, pt in clicks:
                ref.add_new_points_or_box(state, 0, label, points=pt, labels=np.array([1], np.int32))
            sync(device)
            t0 = time.perf_counter()
            n = sum(1 for _ in ref.propagate_in_video(state, max_frame_num_to_track=limit))
            sync(device)
        return n / (time.perf_counter() - t0)

    with torch.inference_mode():
        t0 = time.perf_counter()
        ours_pass(3)  # warm-up (and compilation)
        ref_pass(3)
        warm = time.perf_counter() - t0
        ours_fps = ours_pass(n_frames)
        ref_fps = ref_pass(n_frames)
    return ours_fps, ref_fps, warm, ours.precision


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--models", nargs="+", default=["sam2.1_hiera_tiny", "sam2.1_hiera_base_plus"])
    p.add_argument("--objects", type=int, nargs="+", default=[1, 10])
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-parity", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} | {what} | input {args.size} | {args.frames} frames per pass", flush=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_parity:
            try:
                ok &= parity(device, args.size, Path(tmp))
            except Exception:  # noqa: BLE001 - the speed figures are still worth having
                traceback.print_exc()
                ok = False
        modes = [False] if args.no_compile else [False, True]
        print(f"\n{'model':<24} {'mode':<9} {'objects':>7} {'ours fps':>9} {'ref fps':>8} {'ours/ref':>8} "
              f"{'ours obj-fr/s':>13} {'ref obj-fr/s':>12} {'warm-up s':>9}  ours' precision", flush=True)
        for name in args.models:
            for compiled in modes:
                for k in args.objects:
                    mode = "compiled" if compiled else "eager"
                    try:
                        o, r, warm, prec = one_speed(device, name, args.size, k, compiled, args.frames, Path(tmp))
                    except Exception as exc:  # noqa: BLE001
                        print(f"{name:<24} {mode:<9} {k:>7} failed: {type(exc).__name__}: {exc}", flush=True)
                        ok = False
                        continue
                    print(f"{name:<24} {mode:<9} {k:>7} {o:9.1f} {r:8.1f} {o / r:8.2f} {o * k:13.1f} {r * k:12.1f} "
                          f"{warm:9.1f}  {prec}", flush=True)
                    torch._dynamo.reset()
    print("\ngoals on an H100/H200: tiny >= 91 fps (the published A100 compiled figure), ours >= the reference, "
          "10 objects >= 3x the reference's object-frames per second")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
