#!/usr/bin/env python
"""napari widget: how long the viewer freezes, and how long a click takes to show its mask.

The session of tests/test_napari_responsive.py, at a chosen input size (default 1024, as SAM2 was
trained): a real napari viewer (run under ``xvfb-run -a``) with the widget docked on a 256 x 256
uint16 time-lapse; load the model, click on frame 0, click on the last frame, precompute the stack
into the feature cache, click on frame 1 (the decoder alone answers), propagate both ways, export
OME-Zarr. A 10 ms QTimer beats in the Qt event loop; the longest gap between beats is the longest
freeze. Side by side: the click-to-mask time, which is what the viewer froze for per click when the
widget ran the work in the GUI thread (the widget before this design: 9.4 s for a first click at 1024).

Random weights (no official checkpoint here): masks are mostly empty, the work is the same.

Usage (from the repository root):
    xvfb-run -a python benchmarks/bench_napari.py --image-size 1024 --frames 6 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("NAPARI_SAM2_PRECISION", "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["NAPARI_SAM2_FEATURES"] = str(tmp / "features")  # a cold cache: every frame encoded once
        import napari
        import torch
        from heartbeat import run_session, stack

        from napari_sam2._widget import SAM2Widget
        from napari_sam2.build import build_model

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        checkpoint = tmp / "random.pt"
        torch.save({"model": build_model("sam2.1_hiera_tiny", pretrained=False).state_dict()}, checkpoint)
        viewer = napari.Viewer(show=False)
        viewer.add_image(stack(args.frames), name="movie")
        widget = SAM2Widget(viewer)
        viewer.window.add_dock_widget(widget, name="SAM2")
        widget.checkpoint_edit.setText(str(checkpoint))
        widget.device_combo.setCurrentText("cpu")
        widget.size_spin.setValue(args.image_size)
        figures = run_session(viewer, widget, tmp, args.frames)
        viewer.close()
    print(f"napari widget, sam2.1_hiera_tiny at {args.image_size}, {args.frames} frames of 256 x 256 uint16, "
          f"{args.threads} threads, cpu")
    print(f"{'step':<26}{'worst stall (s)':>16}{'work (s)':>12}{'GUI-thread design froze (s)':>30}")
    work = {"load": figures["load_s"], "first click": figures["first_click_s"],
            "click on another frame": figures["other_frame_click_s"], "precompute": figures["precompute_s"],
            "click after precompute": figures["click_after_precompute_s"], "propagate": figures["propagate_s"]}
    for step, stall in figures["stalls"].items():
        w = work.get(step)
        cell = "" if w is None else f"{w:.2f}"
        print(f"{step:<26}{stall:>16.3f}{cell:>12}{cell:>30}")
    print(f"making the prompt layers (napari's own work in the GUI thread, before the heartbeat): "
          f"{figures['layers_s']:.2f} s")
    print(f"worst stall over the session: {figures['worst_stall_s']:.3f} s (the test asks <= 0.25 s)")
    print(f"click-to-mask: first click {figures['first_click_s']:.2f} s (model loaded, frame encoded), "
          f"another frame {figures['other_frame_click_s']:.2f} s, after precompute "
          f"{figures['click_after_precompute_s']:.3f} s (decoder alone)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
