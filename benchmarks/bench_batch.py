#!/usr/bin/env python
"""How many objects to run as one batch: seconds per object of a tracking step at each batch size.

One ``track_step`` on a frame with a full memory bank (1 conditioning frame + 6 recent frames, 16
object pointers, memory encoder included) for B objects at once, B = 1, 2, 4, ... The batch size with
the fewest seconds per object is what ``VideoPredictor(max_batch=...)`` should get on this device;
the default (``napari_sam2.predictor.video.default_max_batch``) is printed beside it.

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_batch.py --image-size 1024 --threads 2
    PYTHONPATH=src python benchmarks/bench_batch.py --device cuda --batches 1 4 16 32 64 --precision auto
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from napari_sam2.build import build_model
    from napari_sam2.predictor.video import default_max_batch

    device = torch.device(args.device)
    model = build_model(args.model, pretrained=False, device=device, image_size=args.image_size, precision=args.precision)
    side = args.image_size // 16
    with torch.inference_mode():
        feats = model.encode_frame(torch.randn(1, 3, args.image_size, args.image_size, device=device))
        rows = []
        for b in args.batches:
            def entry(b=b):
                return {"maskmem_features": torch.randn(b, 64, side, side, device=device).to(torch.bfloat16),
                        "obj_ptr": torch.randn(b, 256, device=device)}

            bank = {"cond_frame_outputs": {0: entry()},
                    "non_cond_frame_outputs": {t: entry() for t in range(1, 16)}}
            times = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.track_step(feats.expand(b), frame_idx=16, is_init_cond_frame=False, memory=bank, num_frames=32)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times[1:])
            rows.append((b, best, best / b))
    fastest = min(rows, key=lambda r: r[2])[0]
    print(f"model {args.model} | input {args.image_size} | {device} | {model.precision} | "
          f"{torch.get_num_threads()} threads | torch {torch.__version__}")
    print(f"{'batch':>5}  {'s/step':>8}  {'s/object':>8}")
    for b, s, per in rows:
        print(f"{b:>5}  {s:8.3f}  {per:8.3f}{'  <- fastest per object' if b == fastest else ''}")
    print(f"fastest per object: batches of {fastest}; the default cap on {device.type}: {default_max_batch(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
