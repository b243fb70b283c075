"""napari writers for label layers: OME-Zarr (``.zarr``), Cell Tracking Challenge folders, GEFF (``.geff``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _video(data) -> np.ndarray:
    """A labels layer's data as a (T, Y, X) array (a 2D layer is one frame)."""
    if isinstance(data, (list, tuple)):  # multiscale: full resolution
        data = data[0]
    arr = data
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"labels of shape {tuple(arr.shape)} cannot be saved as a (T, Y, X) video; "
            "save a 2D or 3D labels layer (e.g. the 'SAM2 masklets' layer)"
        )
    return arr


def write_ome_zarr(path: str, data, meta: dict) -> list[str]:
    """Write a labels layer as an OME-Zarr store (NGFF 0.4), frame by frame."""
    from .io import ZarrLabelsWriter

    arr = _video(data)
    scale = tuple(float(s) for s in (meta.get("scale") or (1.0,) * arr.ndim))[-3:]
    if len(scale) < 3:
        scale = (1.0,) * (3 - len(scale)) + scale
    dtype = np.uint32 if np.dtype(arr.dtype).itemsize <= 4 else np.uint64
    with ZarrLabelsWriter(path, arr.shape, dtype=dtype, overwrite=True, scale=scale,
                          name=str(meta.get("name") or "labels")) as writer:
        for t in range(arr.shape[0]):
            writer.write(t, np.asarray(arr[t]))
    return [str(path)]


def write_ctc_folder(path: str, data, meta: dict) -> list[str]:
    """Write a labels layer as a Cell Tracking Challenge result folder (masks + res_track.txt)."""
    from .io import write_ctc

    arr = _video(data)
    out = write_ctc(Path(path), arr, overwrite=True)
    return [str(out)]


def write_geff_graph(path: str, data, meta: dict) -> list[str]:
    """Write a labels layer as a GEFF graph plus its labels as OME-Zarr beside it (``NAME.ome.zarr``).

    A layer holds no lineage: every label is one track, without divisions (the widget's Export... keeps
    the divisions it found)."""
    from .io.geff_io import labels_beside, write_geff

    arr = _video(data)
    scale = tuple(float(s) for s in (meta.get("scale") or (1.0,) * arr.ndim))[-3:]
    scale = (1.0,) * (3 - len(scale)) + scale
    out = write_geff(Path(path), arr, scale=None if scale == (1.0, 1.0, 1.0) else scale, overwrite=True)
    return [str(out), str(labels_beside(out))]
