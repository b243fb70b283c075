"""Quick start: track cells through a synthetic 16-bit time-lapse with SAM2, end to end.

    pip install torch==2.13.0 && pip install -e ".[napari]" && python examples/quickstart.py

1. makes a synthetic fluorescence time-lapse (uint16, moving and dividing cells, with ground truth);
2. clicks once on every cell of frame 0 (taken from the ground truth, as you would in napari);
3. runs ``napari_sam2.segment_stack`` with the official ``sam2.1_hiera_tiny`` checkpoint (downloaded
   once, ~150 MB), streaming the labels to an OME-Zarr store;
4. prints where the output went, the tracks table and how well the masks match the ground truth.

Offline, when the checkpoint cannot be downloaded, it says so and runs in *demo mode* on random
weights: the pipeline runs end to end, but the masks are meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import napari_sam2
from napari_sam2.build import resolve_device
from napari_sam2.checkpoints import CheckpointError, resolve_checkpoint
from napari_sam2.synthetic import make_timelapse

DEMO_BANNER = ("DEMO MODE: the pipeline runs end to end but masks are meaningless (random weights, not the "
               "trained SAM2).")


def load_predictor(model: str, device: str, image_size: int | None):
    """The official weights, or random ones (demo mode) when they cannot be had. Returns (predictor, demo)."""
    try:
        checkpoint = resolve_checkpoint(model)  # the cached file, or a download
    except CheckpointError as exc:
        print(f"Could not get the official {model} checkpoint:\n  {exc}\n{DEMO_BANNER}\n", file=sys.stderr)
        import torch

        torch.manual_seed(0)
        net = napari_sam2.build_model(model, pretrained=False, device=resolve_device(device),
                                      image_size=image_size or 512)
        return napari_sam2.VideoPredictor(net), True
    print(f"weights: {checkpoint}")
    return napari_sam2.build_video_predictor(model, checkpoint=checkpoint, device=device, image_size=image_size), False


def mean_iou(pred: np.ndarray, truth: np.ndarray, ids) -> float:
    """Mean over objects and frames where the object exists in the ground truth."""
    scores = []
    for t in range(truth.shape[0]):
        for i in ids:
            gt = truth[t] == i
            if gt.any():
                p = pred[t] == i
                scores.append((gt & p).sum() / (gt | p).sum())
    return float(np.mean(scores)) if scores else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="quickstart_output", help="output folder (default %(default)s)")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--image-size", type=int, default=None,
                        help="network input size (default: 1024 with the official weights, 512 in demo mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    ts = make_timelapse(n_frames=args.frames, shape=(args.size, args.size), n_cells=5, seed=0)
    clicks = ts.clicks(0)  # a table t, y, x, obj_id: the pixel of each cell nearest its centroid
    print(f"synthetic time-lapse: {ts.image.shape} {ts.image.dtype}; {len(clicks)} clicks on frame 0")

    predictor, demo = load_predictor(args.model, args.device, args.image_size)
    out = Path(args.out)
    result = napari_sam2.segment_stack(
        ts.image,
        points=clicks,  # napari order t, y, x; obj_id: one object per click, with the ground truth's id
        predictor=predictor,
        out=out / "labels.ome.zarr",
        overwrite=True,
    )
    tracks_csv = result.to_csv(out / "tracks.csv", overwrite=True)

    print(f"\n{result}")
    print(f"labels (T, Y, X) -> {result.path}   (OME-Zarr; zarr.open_group(path)['0'] is the label array)")
    print(f"tracks table     -> {tracks_csv}")
    if len(result.tracks):
        print(result.tracks.head(10).to_string(index=False))
    else:
        print("(the tracks table is empty: no object has pixels on any frame)")
    iou = mean_iou(result.labels[:], ts.labels, result.obj_ids)
    if demo:
        print(f"\nmean IoU with the ground truth: {iou:.2f}  <- {DEMO_BANNER}")
    else:
        print(f"\nmean IoU with the ground truth: {iou:.2f}")
    print(f"done in {time.perf_counter() - start:.1f} s on {predictor.device} (image_size {predictor.image_size})")
    print(napari_ready())
    return 0


def napari_ready() -> str:
    """Whether `napari` can start here with the plugin: a Qt binding and the plugin's manifest."""
    try:
        import qtpy
    except Exception as exc:  # qtpy raises its own error when no binding is installed
        return (f"napari cannot start: no Qt binding ({exc}). Install one with: pip install -e \".[napari]\" "
                "(PyQt6)")
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    if manager.get_manifest("napari-sam2") is None:
        return "napari starts, but the napari-sam2 plugin is not registered: reinstall with pip install -e ."
    return (f"napari is ready ({qtpy.API_NAME} {qtpy.QT_VERSION}): run `napari`, then Plugins > SAM2 video "
            "segmentation (or File > Open Sample > SAM2 for microscopy)")


if __name__ == "__main__":
    sys.exit(main())
