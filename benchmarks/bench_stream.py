"""Streaming benchmark: Zarr in, Zarr out, one object; peak memory must not grow with the frames.

For every frame count asked (default 100 and 1000), a fresh subprocess

1. writes a synthetic uint16 time-lapse (a bright cell drifting over noise; default 512 x 512) to a
   Zarr store, one chunk per frame (written frame by frame: never whole in memory);
2. builds the model (official weights when cached, else ``--checkpoint``, else random weights:
   the timing and memory are the same, the masks meaningless);
3. runs ``segment_stack(zarr_in, points=[one click on frame 0], out=zarr_out, direction="forward")``,
   sampling its resident memory on every frame;

and reports the wall time, seconds per frame and peak RSS. Memory flat in the number of frames is
the claim: the peak of the 1000-frame run should match the 100-frame run's.

Run from the repository root (small, as on a laptop CPU)::

    PYTHONPATH=src python benchmarks/bench_stream.py --frames 50 400 --size 128 --image-size 256 --threads 1

The full benchmark (a GPU makes it minutes rather than an hour)::

    PYTHONPATH=src python benchmarks/bench_stream.py --frames 100 1000 --size 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_input(path: Path, frames: int, size: int, seed: int = 0) -> tuple[float, float]:
    """A (T, Y, X) uint16 Zarr store, written frame by frame; returns the cell's centre on frame 0."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(seed)
    store = zarr.open_array(str(path), mode="w", shape=(frames, size, size), chunks=(1, size, size), dtype="uint16")
    yy, xx = np.mgrid[0:size, 0:size]
    radius = size * 0.08
    cy, cx = size * 0.3, size * 0.3
    vy, vx = size * 0.4 / max(frames, 1), size * 0.4 / max(frames, 1)
    for t in range(frames):
        y, x = cy + vy * t, cx + vx * t
        cell = ((yy - y) ** 2 + (xx - x) ** 2 <= radius**2) * 2000.0
        store[t] = np.clip(rng.poisson(100.0 + cell), 0, 65535).astype("uint16")
    return cy, cx


def child(args: argparse.Namespace) -> dict:
    """One measurement (runs in its own process so that peak RSS is its own)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import numpy as np

    from napari_sam2 import build_model
    from napari_sam2.api import segment_stack
    from napari_sam2.checkpoints import find_checkpoint
    from napari_sam2.predictor.video import VideoPredictor, build_video_predictor

    work = Path(args.workdir)
    zin, zout = work / f"in_{args.child}.zarr", work / f"out_{args.child}.ome.zarr"
    t0 = time.perf_counter()
    cy, cx = make_input(zin, args.child, args.size)
    t_input = time.perf_counter() - t0
    rss_start = _rss_mib()

    checkpoint = args.checkpoint or find_checkpoint(args.model)
    if checkpoint is not None:
        predictor = build_video_predictor(args.model, checkpoint=checkpoint, device=args.device, image_size=args.image_size)
        weights = str(checkpoint)
    else:
        torch.manual_seed(0)
        model = build_model(args.model, pretrained=False, device=args.device, image_size=args.image_size)
        predictor = VideoPredictor(model)
        weights = "random (no checkpoint: timing and memory are the same, masks meaningless)"
    rss_model = _rss_mib()
    samples: list[float] = []

    def sample(t, frame):
        samples.append(_rss_mib())

    t0 = time.perf_counter()
    result = segment_stack(str(zin), points=np.array([[0, cy, cx]]), predictor=predictor, out=zout,
                           direction="forward", progress=False, callback=sample)
    seconds = time.perf_counter() - t0
    written = int(result.labels.shape[0])
    shutil.rmtree(zin, ignore_errors=True)
    shutil.rmtree(zout, ignore_errors=True)
    n = len(samples)
    return {
        "frames": args.child, "size": args.size, "image_size": predictor.image_size, "device": str(predictor.device),
        "weights": weights, "seconds": seconds, "s_per_frame": seconds / max(n, 1), "input_seconds": t_input,
        "frames_written": written, "rss_start_mib": rss_start, "rss_model_mib": rss_model,
        "rss_at_10pct_mib": samples[max(0, n // 10 - 1)] if n else None, "rss_at_end_mib": samples[-1] if n else None,
        "rss_max_sampled_mib": max(samples) if n else None, "peak_rss_mib": _peak_mib(),
        "track_rows": len(result.tracks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000], help="frame counts (default 100 1000)")
    parser.add_argument("--size", type=int, default=512, help="frame side, pixels (default 512)")
    parser.add_argument("--image-size", type=int, default=None, help="network input size (default 1024)")
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: the cached official one, else random weights)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workdir", default=None, help="where the temporary Zarr stores go (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines too")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(child(args)))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-stream-")
    try:
        import torch

        print(f"streaming benchmark: {args.model}, frames {args.size}x{args.size} uint16, image_size "
              f"{args.image_size or 1024}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
              f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
        results = []
        for frames in args.frames:
            cmd = [sys.executable, __file__, "--child", str(frames), "--size", str(args.size), "--model", args.model,
                   "--device", args.device, "--workdir", workdir]
            for flag, value in (("--image-size", args.image_size), ("--checkpoint", args.checkpoint), ("--threads", args.threads)):
                if value is not None:
                    cmd += [flag, str(value)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {frames}-frame run failed:\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"weights: {results[0]['weights']}")
        header = f"{'frames':>7} {'seconds':>9} {'s/frame':>8} {'RSS model':>10} {'RSS @10%':>9} {'RSS end':>8} {'peak RSS':>9}  (MiB)"
        print(header)
        for r in results:
            print(f"{r['frames']:>7} {r['seconds']:>9.1f} {r['s_per_frame']:>8.3f} {r['rss_model_mib']:>10.0f} "
                  f"{r['rss_at_10pct_mib']:>9.0f} {r['rss_at_end_mib']:>8.0f} {r['peak_rss_mib']:>9.0f}")
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            growth = hi["peak_rss_mib"] - lo["peak_rss_mib"]
            print(f"peak RSS from {lo['frames']} to {hi['frames']} frames: {growth:+.0f} MiB "
                  f"({growth / max(hi['frames'] - lo['frames'], 1) * 1024:+.1f} KiB per extra frame)")
        print(f"load average at end {os.getloadavg()[0]:.1f}")
        if args.json:
            for r in results:
                print(json.dumps(r))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
