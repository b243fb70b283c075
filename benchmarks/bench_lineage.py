#!/usr/bin/env python
"""Lineage cost: tracking steps and seconds per frame against the number of live cells.

A synthetic colony (napari_sam2.synthetic_colony.make_colony: one cell -> 8 in 3 generations, one cell
of the last generation leaves) runs through ``segment_stack(detect_divisions=True)`` on the real
VideoPredictor (random weights), steered by the ground truth (napari_sam2.synthetic_steering: every
call runs on the real predictor, the masks it reports are the truth's, since untrained weights find
no cells). Two engines, in one run on the same machine:

- ``ended``: this engine. A divided mother is ended (VideoPredictor.end_object) on its daughters'
  first frame, a cell gone --lost-after frames is ended: the network tracks the live cells.
- ``kept``: the previous engine, emulated by making end_object a no-op. Every cell ever seen stays
  in the predictor and costs a tracking step on every later frame.

Per frame: live cells of the truth, objects the network tracked (its last pass over the frame: a
division restarts the pass one frame back) and seconds, for both. Then the totals: steps, seconds per
frame, seconds per tracking step, peak RSS, and whether each run's lineage scored TRA = 1.

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_lineage.py --image-size 512 --frames 40 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_sam2.api import segment_stack  # noqa: E402
from napari_sam2.build import build_model  # noqa: E402
from napari_sam2.evaluate import evaluate_ctc  # noqa: E402
from napari_sam2.predictor import VideoPredictor  # noqa: E402
from napari_sam2.synthetic import write_ctc_ground_truth  # noqa: E402
from napari_sam2.synthetic_colony import make_colony  # noqa: E402
from napari_sam2.synthetic_steering import GroundTruthSteering  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--image-size", type=int, default=512, help="network input size (default 512)")
    p.add_argument("--video-size", type=int, default=256, help="frames are VIDEO_SIZE x VIDEO_SIZE (default 256)")
    p.add_argument("--frames", type=int, default=40, help="frames of the colony (default 40: 3 generations)")
    p.add_argument("--cycle", type=int, default=10, help="cell cycle, frames (default 10)")
    p.add_argument("--lost-after", type=int, default=3, help="frames a cell may be gone before its track ends")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", nargs="+", default=["ended", "kept"], choices=("ended", "kept"))
    return p.parse_args(argv)


class _Timed(GroundTruthSteering):
    """The steering predictor, timing each frame it yields (its last pass over the frame counts)."""

    def __init__(self, *args, keep_ended: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_ended = keep_ended
        self.seconds: dict[int, float] = {}
        self.last: dict[int, int] = {}

    def end_object(self, state, obj_id, frame_idx):
        if not self.keep_ended:
            return super().end_object(state, obj_id, frame_idx)
        return None

    def propagate_in_video(self, state, **kwargs):
        frames = super().propagate_in_video(state, **kwargs)
        tick = time.perf_counter()
        try:
            for t, ids, logits in frames:
                self.seconds[t] = time.perf_counter() - tick
                self.last[t] = len(ids)
                yield t, ids, logits
                tick = time.perf_counter()
        finally:
            frames.close()


def run(engine: str, ts, model, args, workdir: Path) -> dict:
    steered = _Timed(VideoPredictor(model), ts.labels, ts.lineage, keep_ended=engine == "kept")
    start = time.perf_counter()
    result = segment_stack(ts.image, points=ts.clicks(0), predictor=steered, progress=False,
                           detect_divisions=True, lost_after=args.lost_after)
    wall = time.perf_counter() - start
    scores = evaluate_ctc(result.to_ctc(workdir / f"{engine}_RES"), workdir / "GT")
    return {"steps": steered.last, "seconds": steered.seconds, "wall": wall, "tra": scores["TRA"],
            "divisions": len(set(result.parents.values())), "objects": len(result.obj_ids)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    ts = make_colony(n_frames=args.frames, shape=(args.video_size,) * 2, n_cells=1, generations=3, cycle=args.cycle,
                     jitter=2, leave=1, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, pretrained=False, image_size=args.image_size, precision=args.precision)
    print(f"# {args.model} (random weights) at {args.image_size}, precision {model_precision(model)}, "
          f"{torch.get_num_threads()} threads, CPU flags: "
          f"{' '.join(f for f in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if f in flags) or 'none listed'}")
    print(f"# colony: {ts.n_frames} frames of {args.video_size}^2, {len(ts.lineage)} cells ever, "
          f"{len(ts.divisions)} divisions, up to {max(len(np.unique(f)) - 1 for f in ts.labels)} at once")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_ctc_ground_truth(ts, workdir / "GT")
        # warm-up (allocator, kernels' first calls), so that neither engine pays it
        segment_stack(ts.image[:4], points=ts.clicks(0), predictor=VideoPredictor(model), progress=False)
        runs = {}
        for engine in args.engines:
            runs[engine] = run(engine, ts, model, args, workdir)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            runs[engine]["rss"] = rss
    seen = [sum(1 for _, b, _, _ in ts.lineage if b <= t) for t in range(ts.n_frames)]
    live = [sum(1 for _, b, e, _ in ts.lineage if b <= t <= e) for t in range(ts.n_frames)]
    head = f"{'frame':>5} {'live':>4} {'seen':>4}"
    for engine in runs:
        head += f" {engine + ' steps':>11} {engine + ' s':>9}"
    print(head)
    for t in range(ts.n_frames):
        row = f"{t:>5} {live[t]:>4} {seen[t]:>4}"
        for r in runs.values():
            row += f" {r['steps'].get(t, 0):>11} {r['seconds'].get(t, float('nan')):>9.3f}"
        print(row)
    print()
    print(f"{'engine':<6} {'steps':>6} {'steps/frame':>11} {'s/frame':>8} {'s/step':>7} {'wall s':>7} "
          f"{'TRA':>5} {'divisions':>9} {'peak RSS MiB':>12}")
    for engine, r in runs.items():
        steps = sum(r["steps"].values())
        secs = sum(r["seconds"].values())
        print(f"{engine:<6} {steps:>6} {steps / ts.n_frames:>11.2f} {secs / ts.n_frames:>8.3f} {secs / max(steps, 1):>7.3f} "
              f"{r['wall']:>7.1f} {r['tra']:>5.3f} {r['divisions']:>9} {r['rss']:>12.0f}")
    print(f"live cells per frame, mean {np.mean(live):.2f}; cells ever seen per frame, mean {np.mean(seen):.2f}")
    if {"ended", "kept"} <= set(runs):
        a, b = (sum(runs[e]["seconds"].values()) for e in ("ended", "kept"))
        print(f"ended / kept seconds of tracking: {a / b:.2f}")
    return 0


def model_precision(model) -> str:
    return str(getattr(model, "precision", "fp32"))


if __name__ == "__main__":
    raise SystemExit(main())
