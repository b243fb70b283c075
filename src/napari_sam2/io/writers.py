"""Streaming label writers: OME-Zarr, ImageJ TIFF, Cell Tracking Challenge, tracks CSV.

Every writer takes frames as they are produced and writes under a temporary
name in the destination folder, renamed to the final name only when complete
(see `napari_sam2.io.atomic`): after a crash, an exception or a full disk,
nothing under the final name looks finished. Existing outputs are replaced
only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr

from .atomic import (
    OutputWriteError,
    atomic_path,
    prepare_destination,
    publish,
    remove_partial,
    temporary_sibling,
    write_error,
)
from .ctc import check_tracks, read_ctc_tracks, tracks_from_labels, write_ctc
from .label_frames import iter_frames, labels_for_dtype, peek

__all__ = [
    "ZarrLabelsWriter", "write_tiff_labels", "write_ctc", "tracks_from_labels",
    "check_tracks", "read_ctc_tracks", "write_tracks_csv", "OutputWriteError",
]

_ZARR_MAJOR = int(zarr.__version__.split(".")[0])
_NGFF_VERSIONS = ("0.4", "0.5")


def _create_label_array(group, shape, chunks, dtype, zarr_format: int):
    """Create array "0" in `group` with "/" chunk keys, on zarr-python 2 or 3."""
    if _ZARR_MAJOR >= 3:
        kwargs = dict(name="0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
        if zarr_format == 2:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        return group.create_array(**kwargs)
    return group.create_dataset("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                dimension_separator="/")


def _open_new_group(path: Path, zarr_format: int):
    if _ZARR_MAJOR >= 3:
        return zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    if zarr_format != 2:
        raise ValueError("OME-Zarr NGFF 0.5 needs zarr-python >= 3 (zarr format 3); "
                         "upgrade zarr or write ngff_version='0.4'")
    return zarr.open_group(str(path), mode="w")


def ngff_label_attrs(name: str, scale: Sequence[float], units: dict | None,
                     version: str) -> dict:
    """OME-Zarr attributes of a (T, Y, X) label image with one resolution level "0"."""
    unit = dict(units or {})
    axes = [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
            {"name": "x", "type": "space"}]
    for ax in axes:
        if unit.get(ax["name"].upper()):
            ax["unit"] = unit[ax["name"].upper()]
    multiscale = {
        "name": name,
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [float(s) for s in scale]}]}],
    }
    if version == "0.4":
        multiscale = {"version": "0.4", **multiscale}
        return {"multiscales": [multiscale], "image-label": {"version": "0.4"}}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": {}}}


class ZarrLabelsWriter:
    """Write a (T, Y, X) label video to OME-Zarr, one frame at a time.

    The store is written under a hidden temporary name (``.NAME.partial-XXXX``)
    and renamed to `path` by `close`. Used as a context manager, an exception
    in the block removes the temporary and no `path` appears.

    Parameters
    ----------
    path : path-like
        Final store, e.g. ``"labels.ome.zarr"``.
    shape : (int, int, int)
        (T, Y, X) of the label video.
    dtype : numpy dtype
        Label dtype, unsigned integer (default uint32).
    chunks : (int, int, int), optional
        Chunk shape; default one chunk per frame, (1, Y, X).
    overwrite : bool
        Replace an existing `path` at `close`.
    scale : (float, float, float)
        Physical size of (T, Y, X) steps, written as the NGFF scale transform.
    units : dict, optional
        Units by axis letter, e.g. ``{"Y": "micrometer", "X": "micrometer"}``.
    ngff_version : {"0.4", "0.5"}
        OME-Zarr version: 0.4 (zarr format 2, read by most tools today) or 0.5
        (zarr format 3, needs zarr-python >= 3).
    name : str
        Image name stored in the metadata.

    Examples
    --------
    >>> with ZarrLabelsWriter("out.ome.zarr", (T, Y, X)) as writer:  # doctest: +SKIP
    ...     for t, frame in enumerate(label_frames):
    ...         writer.write(t, frame)
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype=np.uint32,
                 chunks: Sequence[int] | None = None, overwrite: bool = False,
                 scale: Sequence[float] = (1.0, 1.0, 1.0), units: dict | None = None,
                 ngff_version: str = "0.4", name: str = "labels") -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (T, Y, X) with positive sizes, got {shape}")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"label dtype must be an integer type (e.g. uint32), got {self.dtype}")
        chunks = tuple(int(c) for c in chunks) if chunks is not None else (1,) + shape[1:]
        if len(chunks) != 3 or min(chunks) < 1:
            raise ValueError(f"chunks must be three positive sizes for (T, Y, X), got {chunks}")
        ngff_version = str(ngff_version)
        if ngff_version not in _NGFF_VERSIONS:
            raise ValueError(f"ngff_version must be one of {_NGFF_VERSIONS}, got {ngff_version!r}")
        if len(tuple(scale)) != 3:
            raise ValueError(f"scale must have 3 values for (T, Y, X), got {tuple(scale)}")
        self.shape, self.chunks = shape, chunks
        self.overwrite = overwrite
        self.ngff_version = ngff_version
        self.path = prepare_destination(path, overwrite)
        self._attrs = ngff_label_attrs(name, scale, units, ngff_version)
        self._tmp = temporary_sibling(self.path)
        self._written: set[int] = set()
        self._closed = False
        try:
            zarr_format = 2 if ngff_version == "0.4" else 3
            self._group = _open_new_group(self._tmp, zarr_format)
            self._array = _create_label_array(self._group, shape, chunks, self.dtype, zarr_format)
        except OSError as exc:
            remove_partial(self._tmp)
            raise write_error(exc, self.path) from exc

    @property
    def temporary_path(self) -> Path:
        """Where the store is being written until `close`."""
        return self._tmp

    @property
    def missing_frames(self) -> list[int]:
        """Frame indices not written yet."""
        return [t for t in range(self.shape[0]) if t not in self._written]

    def write(self, t: int, frame) -> None:
        """Write label frame `t`, shape (Y, X); frames may come in any order.

        Raises
        ------
        IndexError
            If `t` is outside 0..T-1.
        ValueError
            If the frame's shape differs from (Y, X) or its labels do not fit `dtype`.
        OutputWriteError
            If the disk refuses the write (the temporary store is removed).
        """
        if self._closed:
            raise RuntimeError(f"writer for '{self.path}' is closed; open a new one to write more")
        if not isinstance(t, (int, np.integer)) or not 0 <= t < self.shape[0]:
            raise IndexError(f"frame index {t!r} is out of range for {self.shape[0]} frames "
                             f"(valid: 0..{self.shape[0] - 1})")
        frame = np.asarray(frame)
        if frame.shape != self.shape[1:]:
            raise ValueError(f"frame {t} has shape {frame.shape}, expected (Y, X) = {self.shape[1:]}")
        frame = labels_for_dtype(frame, self.dtype, f"frame {t}",
                                 hint="create the writer with a wider dtype (e.g. uint32)")
        try:
            self._array[int(t)] = frame
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc
        self._written.add(int(t))

    def close(self) -> Path:
        """Write the OME-Zarr metadata and rename the store to its final path.

        Frames never written stay 0 (background) and a `RuntimeWarning` says which.

        Returns
        -------
        pathlib.Path
            The final store path.
        """
        if self._closed:
            return self.path
        missing = self.missing_frames
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            warnings.warn(f"{len(missing)} of {self.shape[0]} frames were never written to "
                          f"'{self.path}' and are left as background: {shown}",
                          RuntimeWarning, stacklevel=2)
        try:
            self._group.attrs.update(self._attrs)
            publish(self._tmp, self.path, self.overwrite)
        except FileExistsError:
            self._closed = True
            raise
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written; no final store appears."""
        self._closed = True
        remove_partial(self._tmp)

    def __enter__(self) -> ZarrLabelsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._written)}/{self.shape[0]} frames written"
        return f"ZarrLabelsWriter('{self.path}', shape={self.shape}, dtype={self.dtype}, {state})"


_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def write_tiff_labels(path: str | os.PathLike, labels, compression: str | None = "zlib",
                      n_frames: int | None = None, imagej: bool = True,
                      overwrite: bool = False) -> Path:
    """Write a (T, Y, X) label video as one compressed TIFF, streaming frame by frame.

    Parameters
    ----------
    path : path-like
        Output ``.tif`` file, written under a temporary name and renamed when complete.
    labels : array (T, Y, X) or iterable of (Y, X) frames
        Label frames (numpy, dask, zarr, or a generator).
    compression : str or None
        tifffile compression: ``"zlib"`` (deflate, which ImageJ/Fiji read),
        ``"zstd"``, ``"lzw"``, or None.
    n_frames : int, optional
        Number of frames, needed when `labels` is a generator without ``len``.
    imagej : bool
        Write an ImageJ hyperstack (axes TYX, opens in Fiji as a time series).
        ImageJ stores 8/16-bit integers: wider labels are written as uint16
        and a label above 65535 is an error (use ``imagej=False`` to keep
        uint32).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    frames, count = iter_frames(labels, n_frames)
    if n_frames is not None and count != n_frames:
        raise ValueError(f"n_frames={n_frames} but the labels have {count} frames")
    if count is None:
        raise TypeError("the number of frames of a generator is unknown: pass n_frames=T "
                        "(TIFF headers need it before the first frame is written)")
    first, frames = peek(frames)
    if first.ndim != 2:
        raise ValueError(f"label frames must be 2D (Y, X), got a frame of shape {first.shape}")
    dtype = first.dtype if first.dtype.kind in "iu" else np.dtype(np.uint32)
    if imagej and dtype not in _IMAGEJ_DTYPES:
        dtype = np.dtype(np.uint16) if dtype.itemsize >= 2 else np.dtype(np.uint8)
    shape = (count,) + first.shape
    hint = "pass imagej=False to write uint32 labels" if imagej else ""

    def checked():
        n = 0
        for t, frame in enumerate(frames):
            if t >= count:
                raise ValueError(f"got more than n_frames={count} frames")
            frame = np.asarray(frame)
            if frame.shape != first.shape:
                raise ValueError(f"frame {t} has shape {frame.shape}, but frame 0 has {first.shape}; "
                                 "all frames must have the same shape")
            n += 1
            yield labels_for_dtype(frame, dtype, f"frame {t}", hint=hint)
        if n != count:
            raise ValueError(f"expected {count} frames but only {n} came")

    with atomic_path(path, overwrite=overwrite) as tmp:
        bigtiff = not imagej and int(np.prod(shape)) * dtype.itemsize > 2**31
        with tifffile.TiffWriter(tmp, imagej=imagej, bigtiff=bigtiff) as tif:
            tif.write(checked(), shape=shape, dtype=dtype, compression=compression,
                      photometric="minisblack", metadata={"axes": "TYX"})
    return Path(path)


def write_tracks_csv(path: str | os.PathLike, df, overwrite: bool = False, **to_csv) -> Path:
    """Write a tracks table (pandas DataFrame) as CSV, atomically.

    Parameters
    ----------
    path : path-like
        Output ``.csv`` file.
    df : pandas.DataFrame
        The table, written without its index (unless ``index=True`` is passed).
    overwrite : bool
        Replace an existing file.
    **to_csv
        Passed to `pandas.DataFrame.to_csv`.
    """
    to_csv.setdefault("index", False)
    with atomic_path(path, overwrite=overwrite) as tmp:
        df.to_csv(tmp, **to_csv)
    return Path(path)
