"""The label output formats, by name and by file name: one table for the CLI, the widget and the API."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["LABEL_FORMATS", "label_format", "format_of_path", "write_labels"]

#: format -> the suffix of its output (a store, a file, a folder)
LABEL_FORMATS = {"zarr": ".ome.zarr", "tiff": ".tif", "ctc": "_RES", "geff": ".geff"}  # geff: + NAME.ome.zarr
_ALIASES = {"ome-zarr": "zarr", "ome.zarr": "zarr", "tif": "tiff"}


def label_format(fmt: str) -> str:
    """The format's canonical name (``"ome-zarr"`` -> ``"zarr"``); an unknown one is an error."""
    name = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if name not in LABEL_FORMATS:
        raise ValueError(f"unknown labels format {fmt!r}; use one of {', '.join(LABEL_FORMATS)}")
    return name


def format_of_path(path: str | os.PathLike) -> str:
    """The format a path's name asks for: ``.zarr`` -> zarr, ``.tif``/``.tiff`` -> tiff, ``.geff`` -> geff,
    else a CTC folder."""
    name = Path(path).name.lower()
    if name.endswith(".geff"):
        return "geff"
    return "zarr" if name.endswith(".zarr") else "tiff" if name.endswith((".tif", ".tiff")) else "ctc"


def write_labels(path: str | os.PathLike, labels, fmt: str | None = None, tracks=None, overwrite: bool = False) -> Path:
    """Write a ``(T, Y, X)`` label video in ``fmt`` (default: from the name); ``tracks``: CTC lineage rows
    (for ``ctc`` and ``geff``; a GEFF writes the labels beside it as ``NAME.ome.zarr``)."""
    from .io import ZarrLabelsWriter, write_ctc, write_tiff_labels

    fmt = label_format(fmt) if fmt is not None else format_of_path(path)
    if fmt == "geff":
        from .io.geff_io import write_geff
        from .tracking import add_parents, tracks_table

        parents = {label: parent for label, _, _, parent in tracks or () if parent}
        return write_geff(path, labels, add_parents(tracks_table(labels), parents), overwrite=overwrite)
    if fmt == "tiff":
        return write_tiff_labels(path, labels, overwrite=overwrite)
    if fmt == "ctc":
        return write_ctc(path, labels, tracks=tracks, overwrite=overwrite)
    with ZarrLabelsWriter(path, tuple(labels.shape), dtype=np.uint32, overwrite=overwrite) as writer:
        for t in range(labels.shape[0]):
            writer.write(t, np.asarray(labels[t]))
    return Path(path)
