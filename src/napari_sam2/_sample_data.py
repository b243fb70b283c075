"""napari sample data: a small synthetic fluorescence time-lapse with its ground-truth labels."""

from __future__ import annotations


def make_sample_data(n_frames: int = 20, shape: tuple[int, int] = (256, 256), seed: int = 0):
    """``[(image, meta, "image"), (labels, meta, "labels")]`` from :func:`napari_sam2.synthetic.make_timelapse`."""
    from .synthetic import make_timelapse

    ts = make_timelapse(n_frames=n_frames, shape=shape, seed=seed)
    return [
        (ts.image, {"name": "synthetic time-lapse"}, "image"),
        (ts.labels, {"name": "ground truth", "opacity": 0.4, "visible": False}, "labels"),
    ]
