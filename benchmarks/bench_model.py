#!/usr/bin/env python
"""Speed of our SAM2 network against the reference implementation (sam2==1.1.0), same weights.

Builds the reference with seeded random weights (tests/reference.py), saves its checkpoint in the
official layout, loads ours from that file, and times, per 1024x1024 frame and one object:

  (a) the image encoder, ``forward_image``;
  (b) one tracking step on a non-conditioning frame with a full memory bank (1 conditioning frame +
      6 recent frames = 7 memories, 16 object pointers), memory attention + prompt encoder / mask
      decoder + memory encoder (``track_step`` with ``run_mem_encoder=True``);

median of ``--repeats`` runs after one warm-up, under ``torch.inference_mode``, ours and reference
interleaved (so a change in machine load hits both). Prints a table with the ratio ours / reference
(lower is better) and the max abs difference of the outputs (both did the same work).

The reference is a benchmark-only dependency:
    pip install hydra-core iopath && SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0

Usage:
    PYTHONPATH=src python benchmarks/bench_model.py --model sam2.1_hiera_tiny --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # tests/reference.py: the reference oracle

NUM_FRAMES = 32
FRAME = 16  # a non-conditioning frame, conditioning frame 0: memories 0 + 10..15, pointers 0 + 1..15
COND_FRAME = 0
# the product timed in both precisions: Hiera's stage-3 MLP, 4096 tokens x 384 -> 1536
PRODUCT = (4096, 384, 1536)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam2.1_hiera_tiny", help="config name (default: sam2.1_hiera_tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="ours (default auto: bf16 where the hardware computes it natively); the reference runs fp32")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(fn_ours, fn_ref, repeats: int, device):
    """One warm-up each, then ``repeats`` alternating runs; returns (median ours, median ref, outputs)."""
    _, out_o = timed(fn_ours, device)
    _, out_r = timed(fn_ref, device)
    t_o, t_r = [], []
    for i in range(repeats):
        order = [(fn_ours, t_o), (fn_ref, t_r)] if i % 2 == 0 else [(fn_ref, t_r), (fn_ours, t_o)]
        for fn, acc in order:
            acc.append(timed(fn, device)[0])
    return statistics.median(t_o), statistics.median(t_r), out_o, out_r, t_o, t_r


def product_gain(dtype: torch.dtype, repeats: int, device):
    """(ours, reference) seconds of the :data:`PRODUCT` matrix product (the shape that dominates the
    image encoder), in ``dtype`` and in fp32: what computing in ``dtype`` gains on this hardware where
    the work is all products (about 3/4 of ours' bf16 frame on a CPU; the rest, the softmax and passes
    over memory, gains less)."""
    g = torch.Generator().manual_seed(0)
    m, k, n = PRODUCT
    a, b = (torch.randn(*shape, generator=g).to(device) for shape in ((m, k), (k, n)))
    a_o, b_o = a.to(dtype), b.to(dtype)
    return interleaved(lambda: a_o @ b_o, lambda: a @ b, max(repeats, 21), device)[:2]


def max_diff(pairs) -> float:
    return max((a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item() for a, b in pairs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        import sam2  # noqa: F401
        from reference import build_reference, save_official_checkpoint
    except ImportError as exc:
        print(f"the reference implementation sam2==1.1.0 is needed for this benchmark ({exc})", file=sys.stderr)
        return 2
    from napari_sam2.build import build_model
    from napari_sam2.precision import cpu_bf16_features

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    ref = build_reference(args.model, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_official_checkpoint(ref, Path(tmp) / f"{args.model}.pt")
        ours = build_model(args.model, checkpoint=ckpt, device=device, precision=args.precision)
    ref = ref.to(device)
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed)
    image = torch.randn(1, 3, 1024, 1024, generator=g).to(device)

    with torch.inference_mode():
        # (a) image encoder
        enc_o, enc_r, out_o, out_r, _, _ = interleaved(
            lambda: ours.forward_image(image), lambda: ref.forward_image(image), args.repeats, device
        )
        enc_diff = max_diff(list(zip(out_r["backbone_fpn"], out_o["backbone_fpn"]))
                            + [(out_r["vision_features"], out_o["vision_features"])])

        # (b) one tracking step, full memory bank, on the real features of the frame
        feats = ours.frame_features(out_o)
        flat = lambda t: t.float().flatten(2).permute(2, 0, 1)  # noqa: E731  (the reference computes in fp32)
        vf = [flat(feats.high_res[0]), flat(feats.high_res[1]), flat(feats.embed)]
        vp = [None, None, flat(feats.pos)]
        sizes = [tuple(t.shape[-2:]) for t in (feats.high_res[0], feats.high_res[1], feats.embed)]

        def entry():
            # stored in bf16, as the video predictors keep memories
            mem = torch.randn(1, 64, 64, 64, generator=g).to(device=device, dtype=torch.bfloat16)
            pos = ref.memory_encoder.position_encoding(mem).float()
            return {"maskmem_features": mem, "maskmem_pos_enc": [pos],
                    "obj_ptr": torch.randn(1, 256, generator=g).to(device)}

        bank = {
            "cond_frame_outputs": {COND_FRAME: entry()},
            "non_cond_frame_outputs": {t: entry() for t in range(1, FRAME)},
        }
        n_mem = 1 + min(ours.num_maskmem - 1, FRAME - 1)
        n_ptr = 1 + (min(NUM_FRAMES, ours.cfg.max_obj_ptrs_in_encoder) - 1)  # cond frame + preceding frames

        def step_ours():
            return ours.track_step(feats, FRAME, False, memory=bank, num_frames=NUM_FRAMES, run_mem_encoder=True)

        def step_ref():
            return ref.track_step(
                frame_idx=FRAME, is_init_cond_frame=False, current_vision_feats=vf,
                current_vision_pos_embeds=vp, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
                output_dict=bank, num_frames=NUM_FRAMES, track_in_reverse=False, run_mem_encoder=True,
            )

        step_o, step_r, so, sr, _, _ = interleaved(step_ours, step_ref, args.repeats, device)
        step_diff = max_diff([(sr[k], so[k]) for k in
                              ("pred_masks", "pred_masks_high_res", "obj_ptr", "object_score_logits",
                               "maskmem_features")])
        prod_o, prod_r = product_gain(ours.compute_dtype, args.repeats, device)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    threads = torch.get_num_threads()
    flags = ", ".join(cpu_bf16_features()) or "no AMX / AVX-512 BF16"
    print(f"model {args.model} | torch {torch.__version__} | {args.device} "
          f"({platform.processor() or platform.machine()}, {threads} threads, CPU: {flags}) | "
          f"ours {ours.precision} (asked: {args.precision}), reference fp32 | inference_mode | "
          f"median of {args.repeats} after 1 warm-up, ours/reference interleaved")
    print(f"load average 1 min: {load0:.1f} at start, {load1:.1f} at end (timings are only comparable on an idle machine)")
    print(f"setup (build reference + checkpoint + ours): {build_s:.1f} s")
    rows = [
        ("image encoder (forward_image, 1024^2)", enc_o, enc_r, enc_diff),
        (f"tracking step ({n_mem} memories + {n_ptr} pointers, mem. encoder)", step_o, step_r, step_diff),
        ("per frame (encoder + step), 1 object", enc_o + step_o, enc_r + step_r, max(enc_diff, step_diff)),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'seconds per frame':<{w}}  {'ours':>8}  {'reference':>9}  {'ours/ref':>8}  {'max|diff|':>9}")
    for label, o, r, d in rows:
        print(f"{label:<{w}}  {o:8.3f}  {r:9.3f}  {o / r:8.2f}  {d:9.1e}")
    flops = 2 * math.prod(PRODUCT)
    print(f"matrix product alone ({' x '.join(map(str, PRODUCT))}): ours {ours.precision} {flops / prod_o / 1e9:.0f} GFLOP/s, "
          f"fp32 {flops / prod_r / 1e9:.0f} GFLOP/s, {prod_r / prod_o:.2f}x (what {ours.precision} gains "
          f"on this hardware where the work is all products)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
