#!/usr/bin/env python
"""Video predictor: our VideoPredictor against the reference SAM2VideoPredictor (sam2==1.1.0).

Both run the same seeded random weights (the reference is built by tests/reference.py, saved in the
official checkpoint layout, and ours is loaded from that file), on the same preprocessed frames of a
synthetic 16-bit time-lapse (napari_sam2.synthetic.make_timelapse), prompted with one positive click
at the true centre of each cell on frame 0.

--mode speed
    Seconds per frame of ``propagate_in_video`` (preflight + N tracked frames, divided by N) with 1 and
    with 10 objects, ours and the reference in one run; the ratio ours / reference (lower is better)
    and the cost of 10 objects relative to 1 (ours runs objects that share a memory layout as one
    batch; the reference loops over objects). ``max|diff|`` compares the two outputs (same work).
--mode memory
    Peak RSS of a fresh subprocess that propagates 1 object through 30 and through 300 frames, for
    ours and for the reference; masks are discarded as they come. The frames come from a lazy source
    (a 30-frame clip played back and forth), so the video itself does not count. Peak RSS during the
    propagation (ru_maxrss, reset at its start through /proc/self/clear_refs on Linux, so that the
    transient peak of building the model does not hide it) and of the whole process. Ours must stay
    flat: peak(300) / peak(30) <= 1.15.

The reference is a benchmark-only dependency:
    pip install hydra-core iopath && SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_video.py --mode speed --image-size 1024 --frames 8 --threads 2
    PYTHONPATH=src python benchmarks/bench_video.py --mode memory --image-size 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # tests/reference.py: the reference oracle


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--mode", choices=("speed", "memory"), default="speed")
    p.add_argument("--model", default="sam2.1_hiera_tiny", help="config name (default: sam2.1_hiera_tiny)")
    p.add_argument("--image-size", type=int, default=None,
                   help="network input size, a multiple of 64 (default: 1024 for speed, 512 for memory)")
    p.add_argument("--video-size", type=int, default=512, help="frames are VIDEO_SIZE x VIDEO_SIZE uint16 (default 512)")
    p.add_argument("--frames", type=int, default=8, help="speed: frames tracked after the prompted frame 0 (default 8)")
    p.add_argument("--objects", type=int, nargs="+", default=[1, 10], help="speed: object counts (default: 1 10)")
    p.add_argument("--lengths", type=int, nargs=2, default=[30, 300], help="memory: the two video lengths (default: 30 300)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1,
                   help="speed: runs of ours and the reference in turn, each from a fresh feature cache; the "
                   "figures are medians (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (speed mode)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the synthetic video")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="ours: auto (default: bf16 where the hardware computes it natively), fp32 or bf16; the "
                   "reference always runs fp32")
    # internal: one memory measurement in this (fresh) process
    p.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 1024 if args.mode == "speed" else 512
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.image_size <= 0 or args.image_size % 64:
        p.error(f"--image-size must be a positive multiple of 64, got {args.image_size}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cell_clicks(ts, n: int) -> list[tuple[int, float, float]]:
    """(label, x, y) of the first n cells' true centres on frame 0."""
    rows = ts.positions[ts.positions.frame == 0].sort_values("label").head(n)
    return [(int(r.label), float(r.x), float(r.y)) for r in rows.itertuples()]


def need_reference() -> bool:
    try:
        import sam2.sam2_video_predictor  # noqa: F401
        from reference import build_reference  # noqa: F401
    except ImportError as exc:
        print(f"the reference implementation sam2==1.1.0 is needed for this benchmark ({exc})", file=sys.stderr)
        return False
    return True


# ------------------------------------------------------------------------------------------- speed


def timed_passes(predictor, state, clicks, n_track: int, device, refine: bool):
    """(prompts s, first pass s, masks, re-propagation s after a correction, after a kept correction).

    Both re-propagations follow a refinement click of the first object on the middle frame, as a user
    correcting a mask does: first as the official API treats it (the click corrects that tracked frame
    and the next pass re-tracks it), then as the napari plugin does (``add_all_frames_to_correct_as_cond``:
    the corrected frame becomes a conditioning frame, in every later step's memory)."""
    t0 = time.perf_counter()
    for label, x, y in clicks:
        predictor.add_new_points_or_box(state, 0, label, points=np.array([[x, y]], np.float32),
                                        labels=np.array([1], np.int32))
    sync(device)
    t1 = time.perf_counter()
    masks = [m.cpu() for _, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=n_track)]
    sync(device)
    t2 = time.perf_counter()
    again = []
    for keep, dx in ((False, 1), (True, 2)) if refine else ():
        predictor.add_all_frames_to_correct_as_cond = keep
        label, x, y = clicks[0]
        predictor.add_new_points_or_box(state, max(n_track // 2, 1), label, points=np.array([[x + dx, y]], np.float32),
                                        labels=np.array([1], np.int32))
        t3 = time.perf_counter()
        for _ in predictor.propagate_in_video(state, max_frame_num_to_track=n_track):
            pass
        sync(device)
        again.append(time.perf_counter() - t3)
    predictor.add_all_frames_to_correct_as_cond = False
    again += [float("nan")] * (2 - len(again))
    return t1 - t0, t2 - t1, masks, again


def run_ours(predictor, video, clicks, n_track: int, device, cache_dir=None, refine: bool = False):
    from napari_sam2.predictor.feature_cache import open_feature_cache

    if cache_dir is not None:  # a fresh cache: the first pass pays the encoder for every frame, as the reference
        predictor.feature_cache = open_feature_cache(cache_dir)
    t0 = time.perf_counter()
    state = predictor.init_state(video)
    init = time.perf_counter() - t0
    prompts, first, masks, again = timed_passes(predictor, state, clicks, n_track, device, refine)
    predictor.close(state)
    return init + prompts, first, masks, again


def run_reference(ref, images, height, width, clicks, n_track: int, device, refine: bool = False):
    from reference import init_state_from_images

    t0 = time.perf_counter()
    state = init_state_from_images(ref, images, height, width)  # also encodes frame 0, as init_state does
    init = time.perf_counter() - t0
    prompts, first, masks, again = timed_passes(ref, state, clicks, n_track, device, refine)
    return init + prompts, first, masks, again


def speed(args) -> int:
    if not need_reference():
        return 2
    from reference import build_reference, save_official_checkpoint

    from napari_sam2.precision import cpu_bf16_features
    from napari_sam2.predictor import build_video_predictor
    from napari_sam2.predictor.frames import FrameSource
    from napari_sam2.predictor.video import default_max_batch
    from napari_sam2.synthetic import make_timelapse

    device = torch.device(args.device)
    caches = tempfile.TemporaryDirectory()
    size, n = args.image_size, args.frames
    load0 = load_average()
    t0 = time.perf_counter()
    ref = build_reference(args.model, args.seed, image_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_official_checkpoint(ref, Path(tmp) / f"{args.model}_{size}.pt")
        ours = build_video_predictor(args.model, checkpoint=ckpt, device=device, image_size=size,
                                     precision=args.precision, feature_cache=Path(caches.name) / "warm-up")
    ref = ref.to(device)
    n_cells = max(args.objects)
    ts = make_timelapse(n_frames=n + 1, shape=(args.video_size, args.video_size), n_cells=n_cells,
                        divide=False, enter=False, seed=args.seed)
    clicks_all = cell_clicks(ts, n_cells)
    if len(clicks_all) < n_cells:
        print(f"only {len(clicks_all)} cells could be placed in {args.video_size}^2", file=sys.stderr)
    video = ts.image
    # the reference gets exactly the frames ours computes (our per-stack percentile normalisation)
    frames = FrameSource(video, size)
    images = torch.stack([frames[t] for t in range(len(frames))])
    H, W = video.shape[1:]
    setup_s = time.perf_counter() - t0

    with torch.inference_mode():
        # warm-up (first calls of every module), not timed
        run_ours(ours, video, clicks_all[:1], 1, device)
        run_reference(ref, images, H, W, clicks_all[:1], 1, device)
        rows = []
        for k in args.objects:
            clicks = clicks_all[:k]
            runs_o, runs_r, diff = [], [], 0.0
            for rep in range(args.repeats):  # ours and the reference in turn: both see the machine's drift
                cache_dir = Path(caches.name) / f"{k}-objects-{rep}"
                prompt_o, prop_o, masks_o, again_o = run_ours(ours, video, clicks, n, device, cache_dir=cache_dir,
                                                              refine=True)
                shutil.rmtree(cache_dir, ignore_errors=True)
                prompt_r, prop_r, masks_r, again_r = run_reference(ref, images, H, W, clicks, n, device, refine=True)
                diff = max([diff] + [(a.float() - b.float()).abs().max().item() for a, b in zip(masks_o, masks_r)])
                runs_o.append((prompt_o, prop_o / n, *(a / n for a in again_o)))
                runs_r.append((prompt_r, prop_r / n, *(a / n for a in again_r)))
                del masks_o, masks_r
            (prompt_o, so, *ao), (prompt_r, sr, *ar) = (np.median(np.array(r), axis=0) for r in (runs_o, runs_r))
            rows.append((len(clicks), prompt_o, prompt_r, so, sr, ao, ar, diff))
    load1 = load_average()
    caches.cleanup()

    threads = torch.get_num_threads()
    flags = ", ".join(cpu_bf16_features()) or "no AMX / AVX-512 BF16"
    print(f"model {args.model} | network input {size}x{size} | video {n + 1} frames of {W}x{H} uint16 (synthetic) | "
          f"torch {torch.__version__} | {args.device} ({platform.processor() or platform.machine()}, {threads} threads, "
          f"CPU: {flags})")
    print(f"precision: ours {ours.precision} (asked: {args.precision}), reference fp32 | ours' batches: up to "
          f"{ours.max_batch or default_max_batch(device)} objects | ours' feature cache: fresh for each object count and run"
          f" | figures: medians of {args.repeats} run(s) of ours and the reference in turn")
    print(f"prompts: 1 click per object on frame 0 (true cell centres); propagate_in_video over {n} frames; then a "
          f"refinement click of object 1 on frame {max(n // 2, 1)} and propagate_in_video again: 'corr.' as the official "
          "API treats it (the next pass re-tracks the corrected frame), 'kept' as the napari plugin does "
          "(add_all_frames_to_correct_as_cond: it becomes a conditioning frame)")
    print(f"load average 1 min: {load0:.1f} at start, {load1:.1f} at end (timings are only comparable on an idle machine)")
    print(f"setup (build reference + checkpoint + ours + video): {setup_s:.1f} s")
    print()
    hdr = (f"{'objects':>7}  {'init+prompts ours':>17}  {'ref':>6}  {'s/frame ours':>12}  {'reference':>9}  "
           f"{'ref/ours':>8}  {'re-prop corr. ours':>18}  {'ref':>6}  {'1st/re':>6}  "
           f"{'re-prop kept ours':>17}  {'ref':>6}  {'1st/re':>6}  {'max|diff|':>9}")
    print(hdr)
    print("-" * len(hdr))
    for k, po, pr, so, sr, ao, ar, d in rows:
        print(f"{k:>7}  {po:17.2f}  {pr:6.2f}  {so:12.3f}  {sr:9.3f}  {sr / so:8.2f}  {ao[0]:18.3f}  {ar[0]:6.3f}  "
              f"{so / ao[0]:6.2f}  {ao[1]:17.3f}  {ar[1]:6.3f}  {so / ao[1]:6.2f}  {d:9.1e}")
    if len(rows) >= 2:
        (k1, _, _, o1, r1, *_), (kk, _, _, ok, rk, *_) = rows[0], rows[-1]
        print()
        print(f"cost of {kk} objects / {k1} object(s) per frame: ours {ok / o1:.2f}x, reference {rk / r1:.2f}x")
    print("s/frame: propagate_in_video time (memory of the prompts + tracking) / tracked frames; ref/ours > 1: ours "
          "is faster; re-prop: the passes after the refinement clicks, per frame; 1st/re: ours' first pass / that "
          "re-propagation (ours reads features from its cache and reruns only the steps whose inputs changed: "
          "the corrected object's; the reference reruns every step)")
    return 0


# ------------------------------------------------------------------------------------------ memory


class PingPong:
    """A lazy (T, Y, X) video of any length from a short clip played forwards and backwards."""

    def __init__(self, clip: np.ndarray, length: int):
        self.clip = clip
        self.shape = (int(length),) + clip.shape[1:]
        self.dtype = clip.dtype
        self.ndim = clip.ndim

    def _frame(self, t: int) -> int:
        n = len(self.clip)
        period = max(1, 2 * n - 2)
        t %= period
        return t if t < n else period - t

    def _get(self, t: int) -> np.ndarray:
        frame = self.clip[self._frame(t)].copy()
        frame[0, 0] = t  # every frame distinct: the feature cache must not get repeats for free
        return frame

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        idx = np.arange(self.shape[0])[key[0]]
        rest = key[1:]
        if np.ndim(idx) == 0:
            return self._get(int(idx))[rest]
        return np.stack([self._get(int(t))[rest] for t in idx]) if len(idx) else \
            np.zeros((0,) + self.clip[(0,) + rest].shape, self.dtype)


def peak_rss_kib() -> int:
    """Peak resident set size of this process (since the last reset_peak_rss), KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


def current_rss_kib() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss // 1024)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def reset_peak_rss() -> bool:
    """Linux: restart the peak-RSS counter (ru_maxrss, VmHWM) at the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakDuring:
    """Peak RSS from now on: the kernel's counter after a reset, else the max of per-frame samples."""

    def __init__(self):
        self.process_peak = peak_rss_kib()  # build + init + prompts
        self.start = current_rss_kib()
        self.exact = reset_peak_rss()
        self.sampled = self.start

    def sample(self) -> None:
        if not self.exact:
            self.sampled = max(self.sampled, current_rss_kib())

    def result(self) -> dict:
        peak = peak_rss_kib() if self.exact else self.sampled
        return {"prop_peak_kib": peak, "start_kib": self.start, "process_peak_kib": max(self.process_peak, peak),
                "exact": self.exact}


def memory_child(args) -> int:
    """One measurement: build, prompt, propagate ``args.length`` frames, print a JSON line."""
    from napari_sam2.predictor.frames import FrameSource
    from napari_sam2.synthetic import make_timelapse

    size = args.image_size
    ts = make_timelapse(n_frames=30, shape=(args.video_size, args.video_size), n_cells=1, divide=False, enter=False, seed=args.seed)
    video = PingPong(ts.image, args.length)
    (_, x, y), = cell_clicks(ts, 1)
    H, W = video.shape[1:]
    with torch.inference_mode():
        if args.child == "ours":
            from napari_sam2.predictor import build_video_predictor

            cache = tempfile.TemporaryDirectory()
            predictor = build_video_predictor(args.model, checkpoint=args.checkpoint, device="cpu", image_size=size,
                                              precision=args.precision, feature_cache=cache.name)
            state = predictor.init_state(video)
            predictor.add_new_points_or_box(state, 0, 1, points=[[x, y]], labels=[1])
            peak = PeakDuring()
            t0 = time.perf_counter()
            for _ in predictor.propagate_in_video(state):
                peak.sample()
            seconds = time.perf_counter() - t0
            extra = {"cache_mib": predictor.feature_cache.size_bytes() / 2**20}
            cache.cleanup()
        else:
            from reference import build_reference, init_state_from_images

            ref = build_reference(args.model, args.seed, image_size=size)
            # the reference's init_state loads every frame (resized, normalised, fp32) up front
            frames = FrameSource(video, size)
            images = torch.empty(args.length, 3, size, size)
            for t in range(args.length):
                images[t] = frames[t]
            state = init_state_from_images(ref, images, H, W)
            ref.add_new_points_or_box(state, 0, 1, points=np.array([[x, y]], np.float32), labels=np.array([1], np.int32))
            peak = PeakDuring()
            t0 = time.perf_counter()
            for _ in ref.propagate_in_video(state):
                peak.sample()
            seconds = time.perf_counter() - t0
            extra = {"cache_mib": 0.0}
    print(json.dumps({"impl": args.child, "frames": args.length, "seconds": seconds, **peak.result(), **extra}))
    return 0


def memory(args) -> int:
    if not need_reference():
        return 2
    from reference import build_reference, save_official_checkpoint

    size = args.image_size
    load0 = load_average()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_official_checkpoint(build_reference(args.model, args.seed, image_size=size), Path(tmp) / "ckpt.pt")
        for impl in ("ours", "reference"):
            for length in args.lengths:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", "memory", "--child", impl,
                       "--length", str(length), "--checkpoint", str(ckpt), "--model", args.model,
                       "--image-size", str(size), "--video-size", str(args.video_size), "--seed", str(args.seed),
                       "--precision", args.precision]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                print(f"  {impl}: {length} frames ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout + proc.stderr, file=sys.stderr)
                    print(f"{impl} with {length} frames failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
                results[impl, length] = json.loads(proc.stdout.strip().splitlines()[-1])
    load1 = load_average()

    short, long_ = args.lengths
    mib = lambda kib: kib / 1024  # noqa: E731
    threads = args.threads or torch.get_num_threads()
    exact = all(r["exact"] for r in results.values())
    print(f"model {args.model} | network input {size}x{size} (used for this run) | video {args.video_size}x{args.video_size} "
          f"uint16, lazy | 1 object, 1 click on frame 0 | torch {torch.__version__} | cpu, {threads} threads")
    print("each run in a fresh process; masks discarded as they come. RSS in MiB:")
    print("  at start  = after build + init_state + prompt;  process = peak of the whole run (ru_maxrss);")
    print("  propagation = peak while propagating (" + ("ru_maxrss after resetting it via /proc/self/clear_refs"
          if exact else "max of RSS sampled at every frame") + ")")
    print(f"load average 1 min: {load0:.1f} at start, {load1:.1f} at end")
    print()
    hdr = (f"{'':>10}  {'frames':>6}  {'at start':>8}  {'propagation':>11}  {'process':>7}  {'s/frame':>7}  "
           f"{'feature cache on disk':>21}")
    print(hdr)
    print("-" * len(hdr))
    for impl in ("ours", "reference"):
        for length in args.lengths:
            r = results[impl, length]
            print(f"{impl:>10}  {length:6d}  {mib(r['start_kib']):8.0f}  {mib(r['prop_peak_kib']):11.0f}  "
                  f"{mib(r['process_peak_kib']):7.0f}  {r['seconds'] / length:7.3f}  {r['cache_mib']:17.0f} MiB")
    print()
    ratios = {}
    for impl in ("ours", "reference"):
        a, b = results[impl, short], results[impl, long_]
        ratios[impl] = b["prop_peak_kib"] / a["prop_peak_kib"]
        proc = b["process_peak_kib"] / a["process_peak_kib"]
        print(f"{impl:>10}: peak during propagation {long_}/{short} frames = {ratios[impl]:.2f}  "
              f"(whole process {proc:.2f})")
    verdict = "OK" if ratios["ours"] <= 1.15 else "TOO HIGH"
    print(f"ours <= 1.15: {verdict}")
    print(f"peak during propagation, ours / reference at {long_} frames: "
          f"{results['ours', long_]['prop_peak_kib'] / results['reference', long_]['prop_peak_kib']:.2f}")
    return 0 if ratios["ours"] <= 1.15 else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    return speed(args) if args.mode == "speed" else memory(args)


if __name__ == "__main__":
    sys.exit(main())
