#!/usr/bin/env python
"""Fine-tuning: training clips per second and peak memory, frozen image encoder vs LoRA vs full fine-tuning.

``napari_sam2.finetune`` itself runs a few optimiser steps (one clip of ``--frames`` frames each) on a
synthetic annotated time-lapse (``napari_sam2.synthetic.make_timelapse``, moving and dividing cells with
their label masks), starting from seeded random ``sam2.1_hiera_tiny`` weights in the official layout
(no checkpoint needs downloading). Three modes, each in a fresh subprocess so that the peak RSS is the
mode's own:

- ``frozen``: the image encoder is fixed (finetune's default): it runs without a graph;
- ``lora``: LoRA adapters of rank ``--lora-rank`` (8) on the attention projections (``peft``);
- ``full``: every parameter is trained, the image encoder with its layer-wise decayed lr.

s/step is the mean of the history rows' ``seconds`` (one optimiser step: sampling and augmenting the
clip, the forward pass with simulated prompts and corrective clicks, the loss, backward, clipping,
AdamW) over the steps after the first, which is a warm-up. Validation, saving and model building are
outside it: ``val_every`` is set beyond ``--steps``, so finetune only scores the model at the start and
after the last step, and saves at the end; the "run s" column is the whole call. clips/s = 1 / (s/step). Peak RSS is ``ru_maxrss`` of the child process
(building the model included); on CUDA also ``torch.cuda.max_memory_allocated``.

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_train.py --image-size 512 --frames 8 --steps 4 --threads 2
    PYTHONPATH=src python benchmarks/bench_train.py --device cuda --image-size 1024 --steps 3
    PYTHONPATH=src python benchmarks/bench_train.py --image-size 128 --frames 3 --steps 2 --video-size 128  # a check

"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # tests/models.py: the random-weight recipe of the test suite

MODES = ("frozen", "lora", "full")
DESCRIBE = {"frozen": "image encoder frozen", "lora": "LoRA rank {rank}", "full": "full fine-tuning"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="sam2.1_hiera_tiny", help="config name (default: sam2.1_hiera_tiny)")
    p.add_argument("--image-size", type=int, default=512, help="network input size, a multiple of 64 (default 512)")
    p.add_argument("--frames", type=int, default=8, help="frames per training clip (default 8, as SAM2 trains)")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per mode, the first one a warm-up (default 4)")
    p.add_argument("--video-size", type=int, default=512, help="the synthetic frames are N x N uint16 (default 512)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: frozen lora full")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the lora mode (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="finetune's precision (default auto: bf16 autocast where the hardware computes bf16 natively)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, the video and the run")
    # internal: one mode in this (fresh) process
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.image_size <= 0 or args.image_size % 64:
        p.error(f"--image-size must be a positive multiple of 64, got {args.image_size}")
    if args.frames < 1 or args.steps < 1 or args.lora_rank < 1:
        p.error("--frames, --steps and --lora-rank must be >= 1")
    return args


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def random_checkpoint(name: str, size: int, seed: int, path: Path) -> Path:
    """Seeded random weights in the official layout: ``tests/models.random_model`` (noise on every tensor,
    objects made "present": untrained, every mask would be judged absent and the heads see no object)."""
    from models import random_model

    torch.save({"model": random_model(size, seed, name).state_dict()}, path)
    return path


def synthetic_data(args):
    from napari_sam2.synthetic import make_timelapse

    ts = make_timelapse(n_frames=max(2 * args.frames, 4), shape=(args.video_size, args.video_size), n_cells=5,
                        seed=args.seed)
    return ts.image, ts.labels


class _StartLine(logging.Handler):
    """Keeps finetune's start line: "... on DEVICE (bf16 autocast|fp32): N steps, K trainable parameters, ..."."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("fine-tuning "):
            self.text = message


# ------------------------------------------------------------------------------------------- child


def child(args) -> int:
    """One mode: finetune ``args.steps`` steps, then print one JSON line."""
    from napari_sam2.build import resolve_device
    from napari_sam2.precision import resolve_precision
    from napari_sam2.train import loop

    device = resolve_device(args.device)
    notes = []
    if importlib.util.find_spec("matplotlib") is None:
        # the curves are drawn after the last step, outside every figure measured here
        loop.plot_history = lambda *a, **k: None
        notes.append("matplotlib missing: no plot written")
    start_line = _StartLine()
    logger = logging.getLogger("napari_sam2")
    logger.addHandler(start_line)
    logger.setLevel(logging.INFO)
    mode = {"frozen": {"freeze_encoder": True}, "lora": {"lora": args.lora_rank}, "full": {"freeze_encoder": False}}[args.child]
    data = synthetic_data(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    history = loop.finetune(
        [data], Path(args.workdir) / f"{args.child}.pt", model=args.model, checkpoint=args.checkpoint,
        steps=args.steps, image_size=args.image_size, num_frames=args.frames, device=str(device),
        precision=args.precision, seed=args.seed, progress=False, val_every=args.steps + 1, **mode,
    )
    run_s = time.perf_counter() - t0
    steps = [r for r in history.rows if "seconds" in r]  # optimiser steps (not the scores before training)
    seconds = [float(r["seconds"]) for r in steps]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    if len(seconds) == 1:
        notes.append("1 step: the warm-up step is timed")
    trainable = re.search(r"(\d+) trainable parameters", start_line.text)
    autocast = re.search(r"\((bf16 autocast|fp32)\)", start_line.text)
    chosen, why = resolve_precision(args.precision, device)
    print(json.dumps({
        "mode": args.child,
        "trainable": int(trainable.group(1)) if trainable else None,
        "s_per_step": sum(timed) / len(timed),
        "step_seconds": seconds,
        "last_loss": float(steps[-1]["loss"]),
        "run_s": run_s,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss_before,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "autocast": autocast.group(1) if autocast else chosen,
        "precision": chosen,
        "why": why,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "notes": notes,
    }))
    return 0


# ------------------------------------------------------------------------------------------ parent


def run_mode(args, mode: str, checkpoint: Path, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--checkpoint", str(checkpoint),
           "--workdir", str(workdir), "--model", args.model, "--image-size", str(args.image_size),
           "--frames", str(args.frames), "--steps", str(args.steps), "--video-size", str(args.video_size),
           "--lora-rank", str(args.lora_rank), "--device", args.device, "--precision", args.precision,
           "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"  {mode}: {args.steps} steps ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        reason = next((ln for ln in reversed(tail) if ln.strip()), f"exit {proc.returncode}")
        return {"mode": mode, "failed": f"exit {proc.returncode}: {reason.strip()[:100]}"}
    for stale in workdir.glob(f"{mode}.*"):  # a full run's state holds the optimiser: free the disk at once
        with contextlib.suppress(OSError):
            stale.unlink()
    return json.loads(lines[-1])


def row_text(r: dict, args, cuda: bool) -> str:
    label = DESCRIBE[r["mode"]].format(rank=args.lora_rank)
    if "failed" in r:
        return f"{label:<22}  failed: {r['failed']}"
    trainable = f"{r['trainable']:,}" if r["trainable"] is not None else "?"
    line = f"{label:<22}  {trainable:>11}  {r['s_per_step']:8.3f}  {1 / r['s_per_step']:8.3f}  {r['peak_rss_mib']:12.0f}"
    if cuda:
        line += f"  {r['cuda_peak_mib']:13.0f}"
    return line + f"  {r['run_s']:7.1f}  {r['last_loss']:9.3f}  {r['autocast']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    from napari_sam2.build import resolve_device
    from napari_sam2.precision import cpu_bf16_features, resolve_precision

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    chosen, why = resolve_precision(args.precision, device)
    modes = list(dict.fromkeys(args.modes))
    skipped = []
    if "lora" in modes and importlib.util.find_spec("peft") is None:
        modes.remove("lora")
        skipped.append("lora (peft is not installed)")
    flags = ", ".join(cpu_bf16_features()) or "no AMX / AVX-512 BF16"
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    threads = args.threads or torch.get_num_threads()
    print(f"model {args.model} (random weights) | network input {args.image_size}x{args.image_size} | clips of "
          f"{args.frames} frames, up to 3 objects | synthetic {args.video_size}x{args.video_size} uint16 stack of "
          f"{max(2 * args.frames, 4)} frames | torch {torch.__version__}")
    print(f"device {where} | {threads} CPU threads | CPU: {flags}")
    print(f"precision: {args.precision} -> {chosen} ({why})")
    print(f"{args.steps} steps per mode, each mode in a fresh process; s/step = mean of steps 2..{args.steps} "
          "(step 1 is a warm-up)")
    for s in skipped:
        print(f"skipped: {s}")
    load0 = load_average()
    print(f"load average 1 min at start: {load0:.1f} (timings are only comparable on an idle machine)")
    print()
    hdr = (f"{'mode':<22}  {'trainable':>11}  {'s/step':>8}  {'clips/s':>8}  {'peak RSS MiB':>12}"
           + (f"  {'CUDA peak MiB':>13}" if cuda else "") + f"  {'run s':>7}  {'last loss':>9}  finetune ran")
    print(hdr)
    print("-" * len(hdr), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        checkpoint = random_checkpoint(args.model, args.image_size, args.seed, Path(tmp) / "random_base.pt")
        for mode in modes:  # each row as soon as it is measured: a run cut short keeps what it has
            results.append(run_mode(args, mode, checkpoint, Path(tmp)))
            print(row_text(results[-1], args, cuda), flush=True)
    ok = [r for r in results if "failed" not in r]
    notes = sorted({n for r in ok for n in r["notes"]})
    if notes:
        print("notes: " + "; ".join(notes))
    print(f"load average 1 min at end: {load_average():.1f}")
    print("s/step: one optimiser step on one clip (sampling + augmentation, forward with simulated prompts and "
          "corrective clicks, loss, backward, AdamW); run s: the whole finetune call (build, 2 validations, saving)")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
