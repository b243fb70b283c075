"""Lazy reading of TIFF files: plain multipage, ImageJ hyperstacks, OME-TIFF, compressed.

The first image series of the file is exposed as a dask array with one chunk
per image plane. Pixels are decoded by tifffile (through its zarr store) only
when a chunk is computed; compression (zstd, LZW, deflate, ...) is handled by
imagecodecs.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
from dask.base import tokenize

from .axes import map_tiff_axes, to_canonical, validate_axes
from .stack import Stack, StackReadError, check_regular_file

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

# Messages tifffile logs (instead of raising) when a file is cut short or damaged.
_CORRUPTION_HINTS = (
    "invalid page offset",
    "invalid value offset",
    "corrupt",
    "truncat",
    "failed to reshape",
    "failed to read",
)


def _corrupt(path: Path, detail: str) -> StackReadError:
    return StackReadError(
        f"TIFF file '{path}' is corrupt or truncated ({detail}); "
        "re-export or re-copy the file (a partial download or an interrupted save looks like this)"
    )


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover - a broken log record must not hide the real error  # noqa: BLE001
            self.messages.append(str(record.msg))


@contextmanager
def _capture_tifffile_log():
    logger = logging.getLogger("tifffile")
    handler = _LogCapture()
    logger.addHandler(handler)
    old_propagate = logger.propagate
    logger.propagate = False  # we report problems ourselves, with the file name
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def _check_extent(path: Path, series, filesize: int) -> None:
    """Raise if the series' pixel data reaches past the end of the file."""
    offset = getattr(series, "dataoffset", None)
    if offset is not None:  # contiguous data: one block
        end = offset + series.nbytes
        if end > filesize:
            raise _corrupt(path, f"image data ends at byte {end} but the file has {filesize} bytes")
        return
    pages = series.pages
    for page in (pages[0], pages[-1]) if len(pages) else ():
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        ends = [o + c for o, c in zip(offsets, counts) if o]
        if ends and max(ends) > filesize:
            raise _corrupt(path, f"a page's data ends at byte {max(ends)} "
                                 f"but the file has {filesize} bytes")


def _zarr_store_usable() -> bool:
    """tifffile's zarr store (``aszarr``) needs zarr-python >= 3 with recent tifffile."""
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        return False
    return int(zarr.__version__.split(".")[0]) >= 3


#: Read planes through tifffile's zarr store when possible, else page by page.
USE_ZARR_STORE = _zarr_store_usable()


class _TiffSeriesArray:
    """Array-like view of one TIFF series, read plane by plane.

    Planes are read through tifffile's zarr store (``series.aszarr()``, with
    zarr-python >= 3) or, as a fallback, page by page with
    ``series.asarray(key=page_index)`` (one page at a time per file: slower
    with many threads, but safe). Either way only the requested planes are
    read and decoded.

    Picklable: it re-opens the file by path after unpickling, so dask graphs
    built on it can be shipped to distributed workers.
    """

    def __init__(self, path: Path, shape, dtype, series: int = 0, tif=None) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.series = series
        self._tif = tif
        self._zarr = None
        self._lock = threading.RLock()

    def __getstate__(self):
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype.str,
                "series": self.series}

    def __setstate__(self, state):
        self.__init__(state["path"], state["shape"], state["dtype"], state["series"])

    def _series(self):  # call with self._lock held
        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        series = self._tif.series[self.series]
        if tuple(series.shape) != self.shape:
            raise _corrupt(self.path, f"series shape changed from {self.shape} "
                                      f"to {tuple(series.shape)} on re-opening")
        return series

    def _array(self):
        with self._lock:
            if self._zarr is None:
                import zarr

                self._zarr = zarr.open(self._series().aszarr(level=0), mode="r")
            return self._zarr

    def _read_pages(self, key) -> np.ndarray:
        """Read the pages a basic-slicing `key` touches, then slice within them."""
        with self._lock:
            series = self._series()
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        n_pages = max(len(series), 1)
        per_page = math.prod(self.shape) // n_pages
        n_lead = next(n for n in range(self.ndim + 1) if math.prod(self.shape[n:]) == per_page)
        lead_shape, page_shape = self.shape[:n_lead], self.shape[n_lead:]
        lead = [range(*(slice(k, k + 1) if isinstance(k, (int, np.integer)) else k)
                      .indices(size)) for k, size in zip(key[:n_lead], lead_shape)]
        out = np.empty(tuple(len(r) for r in lead) + page_shape, self.dtype)
        for pos, index in zip(itertools.product(*(range(len(r)) for r in lead)),
                              itertools.product(*lead)):
            page = int(np.ravel_multi_index(index, lead_shape)) if lead_shape else 0
            with self._lock:  # one file handle: its seeks and reads must not interleave
                out[pos] = np.asarray(series.asarray(key=page)).reshape(page_shape)
        squeeze = tuple(0 if isinstance(k, (int, np.integer)) else slice(None)
                        for k in key[:n_lead])
        return out[squeeze + key[n_lead:]]

    def __getitem__(self, key):
        try:
            if USE_ZARR_STORE:
                return np.asarray(self._array()[key])
            return self._read_pages(key)
        except StackReadError:
            raise
        except (ValueError, OSError, EOFError, IndexError, KeyError, RuntimeError) as exc:
            # imagecodecs raises its own *Error classes (subclasses of RuntimeError/ValueError)
            raise _corrupt(self.path, f"reading pixels failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # imagecodecs errors do not share one base class
            if "imagecodecs" in type(exc).__module__:
                raise _corrupt(self.path, f"decoding failed: {exc}") from exc
            raise


def _float_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _ome_metadata(xml: str) -> dict:
    out: dict = {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return out
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return out
    sizes = {ax: _float_or_none(pixels.get(f"PhysicalSize{ax}")) for ax in "ZYX"}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if sizes:
        out["physical_pixel_sizes"] = sizes
        unit = pixels.get("PhysicalSizeXUnit", "µm")
        out["units"] = {ax: pixels.get(f"PhysicalSize{ax}Unit", unit) for ax in sizes}
    interval = _float_or_none(pixels.get("TimeIncrement"))
    if interval is not None:
        out["time_interval"] = interval
    names = [ch.get("Name") for ch in pixels if ch.tag.endswith("Channel")]
    if any(names):
        out["channel_names"] = names
    return out


def _imagej_metadata(tif: tifffile.TiffFile) -> dict:
    out: dict = {}
    ij = tif.imagej_metadata or {}
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    sizes = {}
    try:
        xres, yres = page.resolution
        if ij.get("unit") or page.resolutionunit not in (None, 1):
            if xres:
                sizes["X"] = _float_or_none(1.0 / xres)
            if yres:
                sizes["Y"] = _float_or_none(1.0 / yres)
    except (AttributeError, TypeError, ZeroDivisionError, ValueError):
        pass
    spacing = _float_or_none(ij.get("spacing"))
    if spacing is not None:
        sizes["Z"] = spacing
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if sizes:
        out["physical_pixel_sizes"] = sizes
        if ij.get("unit"):
            out["units"] = {ax: ij["unit"] for ax in sizes}
    interval = _float_or_none(ij.get("finterval"))
    if interval is not None:
        out["time_interval"] = interval
    return out


def read_tiff(path: str | os.PathLike, axes: str | None = None) -> Stack:
    """Open the first image series of a TIFF file lazily.

    Parameters
    ----------
    path : str or path-like
        A ``.tif``/``.tiff`` file: plain multipage, ImageJ hyperstack or OME-TIFF,
        uncompressed or compressed (zstd, LZW, deflate, ... via imagecodecs).
    axes : str, optional
        Override the axes, one letter from ``TZCYX`` per dimension of the
        series as tifffile reports it (``tifffile.TiffFile(path).series[0].shape``).
        By default the axes come from ImageJ/OME metadata, and unnamed page
        sequences (tifffile's ``Q``/``I``) are taken as time.

    Returns
    -------
    Stack
        Lazy stack in canonical axis order, e.g. ``"TYX"`` or ``"TZCYX"``.

    Raises
    ------
    StackReadError
        If the file is not a TIFF, is corrupt or truncated, or has axes that
        cannot be mapped to ``TZCYX``.
    """
    path = Path(path)
    check_regular_file(path, "TIFF file")  # a named pipe would block tifffile forever
    filesize = path.stat().st_size
    with _capture_tifffile_log() as log:
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            if filesize < 8:
                raise _corrupt(path, f"only {filesize} bytes") from exc
            raise StackReadError(f"'{path}' is not a readable TIFF file ({exc}); "
                                 "check that it really is a TIFF, or convert it") from exc
        except (OSError, ValueError, EOFError, struct.error) as exc:
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
        try:
            if not tif.series:
                raise StackReadError(f"TIFF file '{path}' contains no image series")
            series = tif.series[0]
            series_axes, series_shape = series.axes, tuple(series.shape)
            series_dtype = series.dtype
            # make tifffile touch every page index it will need, so that a
            # broken page chain shows up now rather than at compute time
            n_pages = len(tif.pages)
        except StackReadError:
            tif.close()
            raise
        except Exception as exc:
            tif.close()
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    problems = [m for m in log if any(h in m.lower() for h in _CORRUPTION_HINTS)]
    if problems:
        tif.close()
        raise _corrupt(path, problems[0].split("> ", 1)[-1])
    try:
        _check_extent(path, series, filesize)
    except StackReadError:
        tif.close()
        raise

    if tif.is_ome:
        fmt = "ome-tiff"
        metadata = _ome_metadata(tif.ome_metadata or "")
    elif tif.is_imagej:
        fmt = "imagej-tiff"
        metadata = _imagej_metadata(tif)
    else:
        fmt = "tiff"
        metadata = {}
    metadata.update(format=fmt, source_axes=series_axes, n_pages=n_pages)
    compression = getattr(series.keyframe, "compression", None)
    if compression is not None:
        metadata["compression"] = getattr(compression, "name", str(compression)).lower()

    proxy = _TiffSeriesArray(path, series_shape, series_dtype, series=0, tif=tif)
    # one chunk per image plane: full Y, X (and samples), 1 along everything else
    chunks = tuple(s if a in "YXS" else 1 for a, s in zip(series_axes, series_shape))
    stat = path.stat()
    name = "tiff-" + tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, series_shape)
    data = da.from_array(proxy, chunks=chunks, name=name, asarray=False, fancy=False,
                         meta=np.empty((0,) * len(series_shape), dtype=series_dtype))

    if axes is not None:
        ours = validate_axes(axes, series_shape, f"'{path.name}' (tifffile axes {series_axes!r})")
        metadata["axes_guessed"] = False
    else:
        index, ours = map_tiff_axes(series_axes, series_shape, f"'{path}'")
        if any(i == 0 for i in index):
            data = data[index]
        # an unnamed page sequence (Q/I) was taken as time: that is a guess
        metadata["axes_guessed"] = any(a in "QI" and s > 1
                                       for a, s in zip(series_axes, series_shape))
        try:
            ours = validate_axes(ours, data.shape, f"'{path.name}'")
        except ValueError as exc:
            raise StackReadError(f"{exc} (mapped from tifffile axes {series_axes!r}); "
                                 "pass axes=... to say what each axis is") from exc
    data, ours = to_canonical(data, ours)
    return Stack(data=data, axes=ours, path=path, metadata=metadata)
