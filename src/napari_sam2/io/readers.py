"""One entry point for every image source (`open_stack`) and the reduction to a video (`select`).

>>> stack = open_stack("movie.ome.tif")          # doctest: +SKIP
>>> stack
Stack(TZCYX: T=50, Z=9, C=2, Y=512, X=512, dtype=uint16, path='movie.ome.tif')
>>> video = select(stack, channel=1, z_project="max")  # doctest: +SKIP
>>> video.axes, video.shape
('TYX', (50, 512, 512))

Nothing here reads pixels: every result wraps a lazy dask array.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .axes import guess_axes, to_canonical, validate_axes
from .frame_folder import FRAME_SUFFIXES, natural_key, read_frame_folder, read_frames
from .stack import Stack, StackReadError, check_pixel_dtype, non_regular_kind
from .tiff_source import TIFF_SUFFIXES, read_tiff
from .zarr_source import is_zarr_path, read_zarr

__all__ = ["Stack", "StackReadError", "open_stack", "select", "video_view"]

_Z_PROJECTIONS = ("max", "mean", "min")


def _is_zarr_array(obj: Any) -> bool:
    return type(obj).__module__.startswith("zarr") and hasattr(obj, "shape") and hasattr(obj, "dtype")


def _from_array(array: Any, axes: str | None) -> Stack:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    metadata: dict[str, Any] = {"format": "array"}
    if axes is not None:
        ours = validate_axes(axes, tuple(array.shape), f"the {type(array).__name__}")
        metadata["axes_guessed"] = False
    else:
        ours = guess_axes(tuple(array.shape))
        metadata["axes_guessed"] = True
    if isinstance(array, da.Array):
        data = array
    else:
        # one chunk per (Y, X) plane keeps frame access cheap; memory is wrapped, not copied
        chunks = tuple(int(s) if a in "YX" else 1 for a, s in zip(ours, array.shape))
        data = da.from_array(array, chunks=chunks)
    data, ours = to_canonical(data, ours)
    return Stack(data=data, axes=ours, path=None, metadata=metadata)


def open_stack(source: Any, axes: str | None = None) -> Stack:
    """Open an image source as a lazy `Stack`, without reading its pixels.

    Parameters
    ----------
    source : path-like, str, numpy/dask/zarr array, list of paths, or Stack
        - ``.tif``/``.tiff`` file: plain multipage (pages -> T), ImageJ hyperstack
          (axes from ImageJ metadata), OME-TIFF (axes from OME-XML); compressed
          files (zstd, LZW, deflate, ...) are decoded on demand.
        - ``.zarr`` folder: a plain zarr array (axes guessed or given), or an
          OME-Zarr image (NGFF 0.4 or 0.5; axes from ``multiscales[0].axes``,
          full-resolution level ``datasets[0]``).
        - a folder of per-frame images (``t000.tif``, ``t001.tif``, ... or
          PNG/JPEG), in natural order; or a glob such as ``"01/t*.tif"``; or a
          list of frame files in the order to use.
        - a single ``.png``/``.jpg`` image.
        - an in-memory numpy, dask or zarr array (wrapped lazily), or a list of
          equally shaped frames (stacked along a new first axis).
    axes : str, optional
        The axes of the source, one letter from ``TZCYX`` per dimension, in the
        source's own order (e.g. ``"TYXC"`` for an RGB movie array). Overrides
        what metadata says and the guess for arrays without metadata (see
        `napari_sam2.io.axes.guess_axes`: 2D ``YX``, 3D ``TYX`` or ``YXC`` when
        the last dimension is 3/4, 4D ``TYXC``/``TCYX``/``TZYX``, 5D ``TZCYX``).
        Prefer giving it explicitly for arrays.

    Returns
    -------
    Stack
        ``data`` is a dask array whose axes (``Stack.axes``) are in canonical
        order, a subsequence of ``"TZCYX"`` that always contains ``Y`` and ``X``.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    StackReadError
        (a `ValueError`) if the file type is unknown, the file is corrupt or
        truncated, a folder holds no frames, or frames disagree in shape.
        Also if the pixels are not intensities (dtype bool, complex, object,
        strings) or the path is a named pipe, socket or device (never opened).
    ValueError
        If `axes` does not fit the data.
    """
    stack = _open(source, axes)
    check_pixel_dtype(stack.dtype, None if stack.path is None else f"'{stack.path}'")
    return stack


def _open(source: Any, axes: str | None) -> Stack:
    if isinstance(source, Stack):
        if axes is not None and validate_axes(axes, source.shape, "the stack") != source.axes:
            raise ValueError(f"the stack already has axes {source.axes!r}; "
                             f"relabelling to {axes!r} is not supported, open the source again")
        return source
    if isinstance(source, (list, tuple)) and source and all(
            isinstance(s, (str, os.PathLike)) for s in source):
        files = [Path(s) for s in source]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} frame file(s) do not exist, e.g. '{missing[0]}'")
        return read_frames(files, axes=axes, source=files[0].parent)
    if isinstance(source, (da.Array, np.ndarray)):
        return _from_array(source, axes)
    if isinstance(source, (list, tuple)) and source and all(
            hasattr(f, "shape") and hasattr(f, "dtype") for f in source):
        shapes = {tuple(f.shape) for f in source}
        if len(shapes) != 1:
            raise ValueError(f"frames in the list have different shapes {sorted(shapes)}; "
                             "all frames of a stack must have the same shape")
        frames = [f if isinstance(f, da.Array) else da.from_array(f, chunks=f.shape)
                  for f in source]
        return _from_array(da.stack(frames), axes)
    if _is_zarr_array(source):
        return read_zarr(source, axes=axes)
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
            return _from_array(source, axes)
        raise TypeError(f"cannot open a {type(source).__name__}: give a file or folder path, "
                        "a glob of frame files, or a numpy/dask/zarr array")

    text = os.fspath(source)
    if any(ch in text for ch in "*?[") and not Path(text).exists():
        files = sorted((Path(p) for p in glob.glob(text)), key=lambda p: natural_key(p.name))
        files = [p for p in files if not p.is_dir()]  # read_frames refuses pipes and devices
        if not files:
            raise FileNotFoundError(f"no files match the pattern '{text}'")
        return read_frames(files, axes=axes, source=Path(text))

    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image source '{path}' does not exist; check the path "
                                f"(working directory: '{Path.cwd()}')")
    kind = non_regular_kind(path)
    if kind is not None:  # opening a FIFO would block forever: refuse before touching it
        raise StackReadError(f"input '{path}' is not a regular file (it is {kind}): pass an image "
                             "file, a folder of frames or a Zarr store")
    if is_zarr_path(path):
        return read_zarr(path, axes=axes)
    if path.is_dir():
        return read_frame_folder(path, axes=axes)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return read_tiff(path, axes=axes)
    if suffix in FRAME_SUFFIXES:  # a single PNG/JPEG image
        stack = read_frames([path], source=path)
        data = stack.data[0] if stack.axes[0] == "T" else stack.data
        frame_axes = stack.axes[1:] if stack.axes[0] == "T" else stack.axes
        if axes is not None:
            frame_axes = validate_axes(axes, data.shape, f"'{path.name}'")
            data, frame_axes = to_canonical(data, frame_axes)
        return Stack(data=data, axes=frame_axes, path=path,
                     metadata={**stack.metadata, "format": suffix.lstrip(".")})
    raise StackReadError(
        f"unknown image file type '{path.suffix}' for '{path}'; supported: TIFF "
        f"({', '.join(TIFF_SUFFIXES)}), Zarr/OME-Zarr (.zarr folders), PNG/JPEG, "
        "and folders of per-frame images"
    )


class _View:
    """A stack being reduced axis by axis (data and axes change together)."""

    def __init__(self, stack: Stack):
        self.stack, self.data, self.axes, self.sizes = stack, stack.data, stack.axes, stack.sizes

    def take(self, axis: str, index, what: str, noun: str) -> None:
        n = self.sizes[axis]
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"{what} must be an integer index, got {index!r}")
        if not 0 <= index < n:
            raise ValueError(f"{what}={index} is out of range: the stack has {n} "
                             f"{noun}{'s' if n != 1 else ''} (axes {self.stack.axes}, shape "
                             f"{self.stack.shape}; valid: {what}=0..{n - 1})")
        pos = self.axes.index(axis)
        self.data = self.data[(slice(None),) * pos + (int(index),)]
        self.axes = self.axes.replace(axis, "")


def _pick_channel(view: _View, channel: int | None) -> None:
    stack = view.stack
    if "C" in view.axes:
        n_channels = view.sizes["C"]
        if channel is None:
            if n_channels != 1:
                raise ValueError(f"the stack has {n_channels} channels (axes {stack.axes}, "
                                 f"shape {stack.shape}); choose one with channel=0..{n_channels - 1} "
                                 "(CLI: --channel N)")
            channel = 0
        if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool):
            raise TypeError(f"channel must be an integer index, got {channel!r}")
        if not 0 <= channel < n_channels:
            raise ValueError(f"channel={channel} is out of range: the stack has {n_channels} "
                             f"channel{'s' if n_channels != 1 else ''} (valid: 0..{n_channels - 1})")
        view.take("C", channel, "channel", "channel")
    elif channel not in (None, 0):
        raise ValueError(f"channel={channel} is out of range: the stack has a single channel "
                         f"(axes {stack.axes}); leave channel=None")


def _video_along_t(view: _View, z, z_project, t, metadata: dict) -> None:
    stack = view.stack
    if t is not None:
        raise ValueError("t= selects the time point of a volume for along='Z'; "
                         "for a video along time leave it out")
    if z is not None and z_project is not None:
        raise ValueError("give either z= (one plane) or z_project= (a projection), not both")
    if "Z" in view.axes:
        if z is not None:
            view.take("Z", z, "z", "Z plane")
        elif z_project is not None:
            if z_project not in _Z_PROJECTIONS:
                raise ValueError(f"z_project must be one of {_Z_PROJECTIONS}, got {z_project!r}")
            view.data = getattr(view.data, z_project)(axis=view.axes.index("Z"))
            if z_project == "mean" and np.issubdtype(stack.dtype, np.integer):
                view.data = view.data.astype(np.float32)
            view.axes = view.axes.replace("Z", "")
            metadata["z_project"] = z_project
        elif view.sizes["Z"] == 1:
            view.take("Z", 0, "z", "Z plane")
        else:
            n_z = view.sizes["Z"]
            raise ValueError(f"the stack has {n_z} Z planes (axes {stack.axes}, shape "
                             f"{stack.shape}): pick one with z=0..{n_z - 1} (CLI: --z N), "
                             "project with z_project='max' (CLI: --z-project max), or "
                             "propagate through the volume with along='Z' (CLI: --along Z)")
    elif z not in (None, 0) or z_project is not None:
        raise ValueError(f"the stack has no Z axis (axes {stack.axes}); leave z and z_project out")
    if "T" not in view.axes:
        view.data = view.data[None]
        view.axes = "T" + view.axes
    metadata["video_axis"] = "T"


def _video_along_z(view: _View, z, z_project, t, metadata: dict) -> None:
    """One volume's planes are the frames."""
    stack = view.stack
    if z is not None or z_project is not None:
        raise ValueError("z= and z_project= do not apply with along='Z' (the Z planes are the frames)")
    if "Z" not in view.axes:
        raise ValueError(f"along='Z' needs a Z axis, but the stack has axes {stack.axes}")
    if "T" in view.axes:
        if t is None:
            if view.sizes["T"] != 1:
                raise ValueError(f"the stack has {view.sizes['T']} time points; choose the volume "
                                 f"to propagate through with t=0..{view.sizes['T'] - 1} (CLI: --t T)")
            t = 0
        view.take("T", t, "t", "time point")
    elif t not in (None, 0):
        raise ValueError(f"t={t} is out of range: the stack has no T axis (axes {stack.axes})")
    view.axes = view.axes.replace("Z", "T")
    metadata["video_axis"] = "Z"
    if t is not None:
        metadata["time_point"] = int(t)
    sizes_um = metadata.get("physical_pixel_sizes")
    if isinstance(sizes_um, dict) and "Z" in sizes_um:
        metadata["frame_spacing"] = sizes_um["Z"]


def video_view(stack: Stack, channel: int | None = None, **planes) -> Stack:
    """The video to segment, decided once for every door: ``TYXC`` (frames ``(Y, X, 3)``) for an RGB
    stack (3 channels, no channel picked, no other axis), else the single-channel ``TYX`` video of
    :func:`select` (``planes``: its ``z``, ``z_project``, ``along``, ``t``)."""
    ax = stack.axes
    if channel is None and not planes and "C" in ax and stack.size("C") == 3 and set(ax) <= set("TCYX"):
        order = [ax.index(a) for a in "TYXC" if a in ax]
        data = stack.data.transpose(order)
        if "T" not in ax:
            data = data[None]
        return Stack(data=data, axes="TYXC", path=stack.path, metadata=dict(stack.metadata))
    return select(stack, channel=channel, **planes)


def select(stack: Stack, channel: int | None = None, z: int | None = None,
           z_project: str | None = None, along: str | None = None,
           t: int | None = None) -> Stack:
    """Reduce a stack to a single-channel video with axes ``"TYX"``, lazily.

    Parameters
    ----------
    stack : Stack
        Any stack from `open_stack` (or a source `open_stack` accepts).
    channel : int, optional
        Channel to keep. Required when the stack has more than one channel.
    z : int, optional
        Z plane to keep (for videos along T). Exclusive with `z_project`.
    z_project : {"max", "mean", "min"}, optional
        Project along Z instead of picking a plane (lazy, per frame).
    along : {"T", "Z"}, optional
        Which axis is the video. ``"T"`` (default when the stack has T) keeps
        time. ``"Z"`` propagates through one 3D volume: the Z planes at time
        point `t` become the frames (default when the stack has Z but no T).
        The result is still labelled ``"TYX"``; ``metadata["video_axis"]``
        says which axis the frames really are.
    t : int, optional
        Time point of the volume for ``along="Z"`` (may be omitted when the
        stack has a single time point).

    Returns
    -------
    Stack
        Axes ``"TYX"``, shape (T, Y, X) (or (Z, Y, X) relabelled for
        ``along="Z"``). A stack with only Y and X becomes one frame, (1, Y, X).

    Raises
    ------
    ValueError
        If the channel, plane or time point is out of range, a needed choice is
        missing (several channels, several Z planes), or options conflict.
    """
    if not isinstance(stack, Stack):
        stack = open_stack(stack)
    if along is None:
        along = "T" if "T" in stack.axes or "Z" not in stack.axes else "Z"
    along = along.upper()
    if along not in ("T", "Z"):
        raise ValueError(f"along must be 'T' (time) or 'Z' (through a volume), got {along!r}")
    view = _View(stack)
    _pick_channel(view, channel)
    metadata = dict(stack.metadata)
    if along == "T":
        _video_along_t(view, z, z_project, t, metadata)
    else:
        _video_along_z(view, z, z_project, t, metadata)
    data, axes = view.data, view.axes
    if axes != "TYX":  # pragma: no cover - guarded by the branches above
        raise ValueError(f"could not reduce axes {stack.axes!r} to 'TYX' (left with {axes!r})")
    return Stack(data=data, axes="TYX", path=stack.path, metadata=metadata)
