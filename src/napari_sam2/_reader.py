"""napari reader for what napari cannot open lazily: OME-Zarr / Zarr stores and folders of frames.

Pixels stay on disk: the layer's data is the lazy dask array of :func:`napari_sam2.io.open_stack`.
"""

from __future__ import annotations

import os
from pathlib import Path


def _claims(path: Path) -> bool:
    if not path.is_dir():
        return False
    from .io.frame_folder import list_frame_files
    from .io.zarr_source import is_zarr_path

    if is_zarr_path(path):
        return True
    try:
        list_frame_files(path)
    except Exception:
        return False
    return True


def get_reader(path):
    """The reader function for ``path`` if it is a ``.zarr`` store or a folder of frames, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    if not _claims(Path(path)):
        return None
    return read_stack


def read_stack(path):
    """``[(data, meta, layer_type)]`` for napari; channels become separate layers."""
    from .io import open_stack

    if isinstance(path, (list, tuple)):
        path = path[0]
    stack = open_stack(path)
    path = Path(path)
    name = path.name[: -len(".ome.zarr")] if path.name.endswith(".ome.zarr") else path.stem or path.name
    meta: dict = {"name": name, "metadata": {"axes": stack.axes, "source": str(path), **{
        k: v for k, v in stack.metadata.items() if isinstance(v, (str, int, float, bool, dict, list))}}}
    sizes = stack.metadata.get("physical_pixel_sizes") or {}
    axes_no_c = stack.axes.replace("C", "")
    scale = [float(sizes.get(a) or 1.0) for a in axes_no_c]
    if any(s != 1.0 for s in scale):
        meta["scale"] = scale
    if "C" in stack.axes:
        meta["channel_axis"] = stack.axes.index("C")
    # napari labels layers read in OME-Zarr: an integer-only store named "labels" opens as labels
    kind = "labels" if (stack.dtype.kind in "iu" and "label" in path.name.lower() and "C" not in stack.axes) else "image"
    if kind == "labels":
        meta.pop("channel_axis", None)
    return [(stack.data, meta, kind)]
