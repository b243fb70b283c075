"""Lazy reading of Zarr arrays and OME-Zarr images (NGFF 0.4 and 0.5).

OME-Zarr: the axes come from ``multiscales[0].axes`` (NGFF 0.4: in the group's
``.zattrs``; NGFF 0.5: under ``attributes["ome"]`` in ``zarr.json``) and the
full-resolution level is ``multiscales[0].datasets[0].path``. A plain zarr
array carries no axes: they are guessed or given with ``axes=``.

Works with zarr-python 2 and 3; NGFF 0.5 (zarr format 3) needs zarr-python >= 3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import zarr

from .axes import guess_axes, to_canonical, validate_axes
from .stack import Stack, StackReadError

ZARR_MAJOR = int(zarr.__version__.split(".")[0])
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


def is_zarr_path(path: Path) -> bool:
    """True if `path` names a zarr store (a folder holding zarr metadata files)."""
    if path.suffix.lower() == ".zarr":
        return True
    return path.is_dir() and any((path / m).exists() for m in _ZARR_MARKERS)


def _is_group(node) -> bool:
    return isinstance(node, zarr.Group) if hasattr(zarr, "Group") else hasattr(node, "array_keys")


def _attrs(node) -> dict:
    try:
        return dict(node.attrs.asdict())
    except AttributeError:
        return dict(node.attrs)


def _multiscales(attrs: dict) -> tuple[list | None, str | None]:
    """Return (multiscales list, NGFF version) from a group's attributes."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return ome["multiscales"], str(ome.get("version", "0.5"))
    if "multiscales" in attrs:
        ms = attrs["multiscales"]
        version = ms[0].get("version", "0.4") if ms and isinstance(ms[0], dict) else "0.4"
        return ms, str(version)
    return None, None


def _ngff_axes(multiscale: dict, where: str) -> tuple[str, dict]:
    """Turn NGFF ``axes`` (list of dicts, or of names in NGFF 0.3) into our letters."""
    raw = multiscale.get("axes")
    if raw is None:  # NGFF <= 0.2 had no axes: always 5D tczyx
        raw = ["t", "c", "z", "y", "x"]
    names, units = [], {}
    for ax in raw:
        name = ax.get("name") if isinstance(ax, dict) else ax
        if not isinstance(name, str):
            raise StackReadError(f"{where}: invalid OME-Zarr axis entry {ax!r}")
        letter = name.upper()
        if letter not in "TZCYX" or len(letter) != 1:
            raise StackReadError(
                f"{where}: OME-Zarr axis {name!r} is not one of t, z, c, y, x; "
                "pass axes=... to say what each axis is"
            )
        names.append(letter)
        if isinstance(ax, dict) and ax.get("unit"):
            units[letter] = ax["unit"]
    return "".join(names), units


def _scale(multiscale: dict, axes: str) -> dict[str, float]:
    """Physical scale per axis of the full-resolution level (dataset scale x global scale)."""
    scale = [1.0] * len(axes)
    transforms = list(multiscale["datasets"][0].get("coordinateTransformations", []))
    transforms += list(multiscale.get("coordinateTransformations", []))
    for tr in transforms:
        if tr.get("type") == "scale" and isinstance(tr.get("scale"), list) \
                and len(tr["scale"]) == len(axes):
            scale = [a * float(b) for a, b in zip(scale, tr["scale"])]
    return dict(zip(axes, scale))


def _open_store(path: Path):
    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:
        hint = ""
        if ZARR_MAJOR < 3 and (path / "zarr.json").exists():
            hint = " This is a zarr format 3 store (e.g. OME-Zarr NGFF 0.5): upgrade to zarr>=3."
        raise StackReadError(f"cannot open zarr store '{path}': {type(exc).__name__}: {exc}.{hint}") \
            from exc


def _find_image_group(group, path: Path):
    """Descend into bioformats2raw-style layouts (image in child group "0")."""
    ms, _ = _multiscales(_attrs(group))
    if ms:
        return group
    if "0" in group and _is_group(group["0"]):
        ms, _ = _multiscales(_attrs(group["0"]))
        if ms:
            return group["0"]
    arrays = sorted(group.array_keys())
    groups = sorted(group.group_keys())
    if len(arrays) == 1 and not groups:
        return group[arrays[0]]
    raise StackReadError(
        f"zarr group '{path}' has no OME-Zarr 'multiscales' metadata and holds "
        f"arrays {arrays or 'none'} and groups {groups or 'none'}; open one array directly, "
        f"e.g. '{path / (arrays[0] if arrays else 'ARRAY')}'"
    )


def read_zarr(source: Any, axes: str | None = None) -> Stack:
    """Open a zarr array, zarr group or OME-Zarr image lazily.

    Parameters
    ----------
    source : str, path-like, or zarr array
        A ``.zarr`` folder (plain array, or OME-Zarr multiscale image group), a
        path to an array inside a store, or an already opened zarr array.
    axes : str, optional
        Override the axes, one letter from ``TZCYX`` per dimension. Required
        for plain arrays whose axes cannot be guessed right (see `guess_axes`).

    Returns
    -------
    Stack
        Lazy stack in canonical axis order; for OME-Zarr the full-resolution level,
        with ``metadata["physical_pixel_sizes"]`` from its scale transform.
    """
    path = None
    node = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        node = _open_store(path)
        if _is_group(node):
            node = _find_image_group(node, path)
    where = f"'{path}'" if path is not None else "zarr array"

    metadata: dict[str, Any] = {}
    if _is_group(node):
        ms, version = _multiscales(_attrs(node))
        multiscale = ms[0]
        try:
            level_path = multiscale["datasets"][0]["path"]
        except (KeyError, IndexError, TypeError) as exc:
            raise StackReadError(f"{where}: OME-Zarr multiscales[0] has no datasets[0].path") from exc
        ngff_axes, units = _ngff_axes(multiscale, where)
        try:
            array = node[level_path]
        except KeyError as exc:
            raise StackReadError(f"{where}: OME-Zarr level {level_path!r} listed in multiscales "
                                 "is missing from the store") from exc
        metadata["format"] = f"ome-zarr-{version}"
        metadata["source_axes"] = ngff_axes
        metadata["level_path"] = level_path
        scale = _scale(multiscale, ngff_axes)
        sizes = {a: s for a, s in scale.items() if a in "ZYX"}
        if sizes:
            metadata["physical_pixel_sizes"] = sizes
        if "T" in scale and scale["T"] != 1.0:
            metadata["time_interval"] = scale["T"]
        if units:
            metadata["units"] = units
        if "image-label" in _attrs(node) or "image-label" in _attrs(node).get("ome", {}):
            metadata["is_labels"] = True
        if len(ngff_axes) != array.ndim:
            raise StackReadError(f"{where}: OME-Zarr axes {ngff_axes!r} do not match the "
                                 f"{array.ndim}D array at {level_path!r} (shape {array.shape})")
        found_axes = ngff_axes
    else:
        array = node
        metadata["format"] = "zarr"
        found_axes = None

    data = da.from_zarr(array)
    if axes is not None:
        ours = validate_axes(axes, data.shape, where)
        metadata["axes_guessed"] = False
    elif found_axes is not None:
        ours = validate_axes(found_axes, data.shape, where)
        metadata["axes_guessed"] = False
    else:
        ours = guess_axes(data.shape)
        metadata["axes_guessed"] = True
    data, ours = to_canonical(data, ours)
    return Stack(data=data, axes=ours, path=path, metadata=metadata)
