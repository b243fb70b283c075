"""Lazy reading of Zarr arrays and OME-Zarr images (NGFF 0.4 and 0.5).

OME-Zarr: the axes come from ``multiscales[0].axes`` (NGFF 0.4: in the group's
``.zattrs``; NGFF 0.5: under ``attributes["ome"]`` in ``zarr.json``) and the
full-resolution level is ``multiscales[0].datasets[0].path``. A plain zarr
array carries no axes: they are guessed or given with ``axes=``.

Works with zarr-python 2 and 3; NGFF 0.5 (zarr format 3) needs zarr-python >= 3.

Pixels are read chunk by chunk when a dask task computes them (`_ZarrPixels`).
zarr itself returns the fill value for a chunk that is not in the store, which
would turn a frame lost in an interrupted copy into a black frame; we refuse
that for intensity images (stores on disk, or any non-memory store): each
chunk a read needs must exist, and a chunk that fails to decode is reported
with the store and the frame. OME-Zarr label images (``image-label``) are
exempt: absent chunks are background there.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

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


def _chunk_key_function(array):
    """``coords -> store key`` of the chunk (the shard, for sharded arrays) at grid `coords`."""
    if ZARR_MAJOR >= 3:
        encode = array.metadata.encode_chunk_key
        prefix = f"{array.path}/" if array.path else ""
        return lambda coords: prefix + encode(tuple(coords))
    return lambda coords: array._chunk_key(tuple(coords))  # zarr 2: includes the array's path


def _local_root(store) -> str | None:
    """The folder of a store on the local file system, else None."""
    if ZARR_MAJOR >= 3:
        from zarr.storage import LocalStore

        return str(store.root) if isinstance(store, LocalStore) else None
    root = getattr(store, "path", None)  # DirectoryStore, NestedDirectoryStore
    name = type(store).__name__
    if isinstance(root, str) and name in ("DirectoryStore", "NestedDirectoryStore"):
        return root
    return None


def _is_memory_store(store) -> bool:
    if isinstance(store, dict):
        return True
    return type(store).__name__ in ("MemoryStore", "KVStore", "GpuMemoryStore")


def _describe_store(array, path: Path | None) -> str:
    """``zarr store '/x/movie.ome.zarr' (array '0')`` for messages."""
    if path is not None:
        where = str(path)
    else:
        where = _local_root(array.store)
        if where is None:
            where = str(getattr(array, "store_path", None) or array.store)
            return f"zarr array '{where}'"
    name = getattr(array, "path", "") or ""
    return f"zarr store '{where}'" + (f" (array '{name}')" if name else "")


class _ZarrPixels:
    """Array-like view of a zarr array for `dask.array.from_array`: reads like the zarr
    array, but refuses chunks that are absent from the store (zarr would return its fill
    value, a black frame) and names the store and frame when a chunk cannot be decoded.

    The check costs one ``stat`` per chunk read for stores on the local file system (an
    ``exists`` request for other stores); it is skipped for in-memory stores and when
    `allow_missing` is set (label images, where absent chunks are background).
    """

    def __init__(self, array, where: str, axes: str | None, allow_missing: bool = False) -> None:
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.where = where
        self.axes = axes  # the array's own axis letters (not canonical), for messages
        shards = getattr(array, "shards", None) if ZARR_MAJOR >= 3 else None
        self.grid = tuple(int(c) for c in (shards or array.chunks))
        store = array.store
        self._root = None
        self._check = False
        if not allow_missing and self.ndim and all(self.shape):
            try:
                self._root = _local_root(store)
                self._check = self._root is not None or not _is_memory_store(store)
            except Exception:  # pragma: no cover - exotic store: read as zarr does  # noqa: BLE001
                self._check = False

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_key_of"}

    def _key(self, coords) -> str:
        key_of = self.__dict__.get("_key_of")
        if key_of is None:
            key_of = self.__dict__["_key_of"] = _chunk_key_function(self.array)
        return key_of(coords)

    def _exists(self, key: str) -> bool:
        if self._root is not None:
            return os.path.isfile(os.path.join(self._root, *key.split("/")))
        store = self.array.store
        if ZARR_MAJOR >= 3:
            from zarr.core.sync import sync

            return bool(sync(store.exists(key)))
        chunk_store = getattr(self.array, "chunk_store", None) or store
        return key in chunk_store

    def _chunk_coords(self, key: tuple) -> list[tuple[int, ...]]:
        ranges = []
        for k, size, step in zip(key, self.shape, self.grid):
            start, stop, _ = k.indices(size)
            if stop <= start:
                return []
            ranges.append(range(start // step, (stop - 1) // step + 1))
        return list(itertools.product(*ranges))

    def _region(self, coords: tuple[int, ...]) -> str:
        """Human words for the part of the array a chunk covers: 'frame 3 (z=2)'."""
        axes = self.axes or "?" * self.ndim
        spans = {}
        for letter, c, step, size in zip(axes, coords, self.grid, self.shape):
            lo, hi = c * step, min((c + 1) * step, size) - 1
            spans[letter] = (lo, hi, size)

        def fmt(lo, hi):
            return f"{lo}" if lo == hi else f"{lo}..{hi}"

        others = [f"{a.lower()}={fmt(lo, hi)}" for a, (lo, hi, size) in spans.items()
                  if a in "ZC" and size > 1]
        plane = [f"{'rows' if a == 'Y' else 'columns'} {fmt(lo, hi)}"
                 for a, (lo, hi, size) in spans.items() if a in "YX" and (lo, hi) != (0, size - 1)]
        if "T" in spans:
            lo, hi, _ = spans["T"]
            head = f"frame {lo}" if lo == hi else f"frames {lo}..{hi}"
        elif others:
            head, others = "plane " + others[0], others[1:]
        elif "?" in spans or not self.axes:  # axes unknown: give the index
            head = "the block at index (" + ", ".join(
                fmt(c * st, min((c + 1) * st, n) - 1)
                for c, st, n in zip(coords, self.grid, self.shape)) + ")"
            others, plane = [], []
        else:
            head = "the image"
        extra = others + plane
        return head + (f" ({', '.join(extra)})" if extra else "")

    def _missing(self, coords, key: str) -> StackReadError:
        return StackReadError(
            f"{self.where}: {self._region(coords)} has no data on disk (chunk '{key}' is "
            "missing): the store is incomplete (an interrupted copy or write?). Copy it again "
            "or re-export the frame. (If that frame really is all fill value and the writing "
            "tool skipped empty chunks, as zarr-python 3 does by default, write the store "
            "again with write_empty_chunks=True.)"
        )

    def _damaged(self, coords, key: str, exc: BaseException) -> StackReadError:
        detail = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, OSError) and not isinstance(exc, EOFError):
            return StackReadError(
                f"{self.where}: {self._region(coords)} could not be read (chunk '{key}': "
                f"{detail}); check that the store is readable, or copy it again"
            )
        return StackReadError(
            f"{self.where}: {self._region(coords)} is corrupt (chunk '{key}' cannot be decoded: "
            f"{detail}): the store is damaged (an interrupted copy or write, or a disk error?). "
            "Copy it again or re-export the frame."
        )

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(not isinstance(k, slice) for k in key):  # dask passes slices; anything else: as is
            return np.asarray(self.array[key])
        key = key + (slice(None),) * (self.ndim - len(key))
        coords = self._chunk_coords(key)
        if self._check:
            for c in coords:
                k = self._key(c)
                if not self._exists(k):
                    raise self._missing(c, k)
        try:
            return np.asarray(self.array[key])
        except StackReadError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise self._locate(coords, exc) from exc

    def _locate(self, coords, exc: BaseException) -> StackReadError:
        """Find the chunk that fails (error path only: re-reads the chunks one by one)."""
        for c in coords if len(coords) > 1 else ():
            region = tuple(slice(i * st, min((i + 1) * st, n))
                           for i, st, n in zip(c, self.grid, self.shape))
            try:
                self.array[region]
            except Exception as again:  # noqa: BLE001 - this chunk is the damaged one
                return self._damaged(c, self._key(c), again)
        first = coords[0] if coords else (0,) * self.ndim
        return self._damaged(first, self._key(first), exc)


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
    Raises
    ------
    StackReadError
        At opening, if the store or its OME-Zarr metadata cannot be read; when a
        frame is computed, if a chunk it needs is missing from the store (except
        for label images) or cannot be decoded: the message names the store,
        the frame and the chunk key.
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

    shape = tuple(int(n) for n in array.shape)
    if axes is not None:
        ours = validate_axes(axes, shape, where)
        metadata["axes_guessed"] = False
    elif found_axes is not None:
        ours = validate_axes(found_axes, shape, where)
        metadata["axes_guessed"] = False
    else:
        ours = guess_axes(shape)
        metadata["axes_guessed"] = True
    pixels = _ZarrPixels(array, _describe_store(array, path), ours,
                         allow_missing=bool(metadata.get("is_labels")))
    data = da.from_array(pixels, chunks=tuple(array.chunks), asarray=False, fancy=False,
                         name="zarr-" + tokenize(array, tuple(array.chunks), "checked"),
                         meta=np.empty((0,) * len(shape), dtype=pixels.dtype))
    data, ours = to_canonical(data, ours)
    return Stack(data=data, axes=ours, path=path, metadata=metadata)
