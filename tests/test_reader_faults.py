"""Readers facing damaged or unusual inputs: a clear error naming what is wrong, inputs untouched.

- a Zarr chunk missing from the store, or replaced by garbage, fails when that frame is read
  (not a black frame), naming the store and the frame; other frames still read;
- a named pipe (FIFO) given as input, or among frame files, is refused without being opened;
- pixels that are not intensities (bool, complex, object, strings) are refused when opening.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam2.io import StackReadError, ZarrLabelsWriter, open_stack, select

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
N_FRAMES, BAD = 6, 3
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo")


def _movie(shape=(N_FRAMES, 16, 20), dtype=np.uint16):
    # frame t is filled with 100 + t plus noise: no frame equals the fill value
    rng = np.random.default_rng(0)
    base = (100 + np.arange(shape[0])).reshape((-1,) + (1,) * (len(shape) - 1))
    return (base + rng.integers(0, 50, size=shape)).astype(dtype)


def _hashes(root: Path) -> dict[str, str]:
    """Content hash of every file under `root` (or of `root` itself)."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _write_ome_zarr(path: Path, movie: np.ndarray, zarr_format: int, separator: str | None = None):
    """OME-Zarr (NGFF 0.4 for format 2, 0.5 for format 3) with one chunk per frame in array '0'."""
    chunks = (1,) * (movie.ndim - 2) + movie.shape[-2:]
    names = {3: "tyx", 4: "tzyx", 5: "tczyx"}[movie.ndim]
    ms = [{"name": "img", "axes": [{"name": a} for a in names], "datasets": [{"path": "0"}]}]
    if ZARR3:
        group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
        kwargs = {}
        if separator is not None and zarr_format == 2:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": separator}
        arr = group.create_array(name="0", shape=movie.shape, dtype=movie.dtype, chunks=chunks,
                                 **kwargs)
    else:
        group = zarr.open_group(str(path), mode="w")
        arr = group.create_dataset("0", shape=movie.shape, dtype=movie.dtype, chunks=chunks,
                                   dimension_separator=separator or ".")
    arr[...] = movie
    if zarr_format == 2:
        group.attrs.update({"multiscales": [{"version": "0.4", **ms[0]}]})
    else:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": ms}})
    return arr


def _chunk_file(store: Path, zarr_format: int, coords, separator: str | None = None) -> Path:
    if zarr_format == 3:
        return store.joinpath("0", "c", *map(str, coords))
    if separator == "/":
        return store.joinpath("0", *map(str, coords))
    return store / "0" / ".".join(map(str, coords))


ZARR_LAYOUTS = [
    pytest.param(2, None, id="v2-dot"),
    pytest.param(2, "/", id="v2-slash"),
    pytest.param(3, None, id="v3", marks=pytest.mark.skipif(not ZARR3, reason="needs zarr-python 3")),
]


# --------------------------------------------------------------------------- missing chunks


@pytest.mark.parametrize("zarr_format, separator", ZARR_LAYOUTS)
def test_missing_zarr_chunk_is_an_error_naming_store_and_frame(tmp_path, zarr_format, separator):
    movie = _movie()
    store = tmp_path / "movie.ome.zarr"
    _write_ome_zarr(store, movie, zarr_format, separator)
    chunk = _chunk_file(store, zarr_format, (BAD, 0, 0), separator)
    assert chunk.is_file()
    chunk.unlink()  # an interrupted copy
    before = _hashes(store)

    stack = open_stack(store)  # opening reads no pixels: still fine
    assert stack.axes == "TYX" and stack.shape == movie.shape
    for t in (0, BAD - 1, BAD + 1, N_FRAMES - 1):  # the other frames read as before
        np.testing.assert_array_equal(stack.data[t].compute(), movie[t])
    with pytest.raises(StackReadError) as info:
        stack.data[BAD].compute()
    message = str(info.value)
    assert f"zarr store '{store}'" in message and "(array '0')" in message
    assert f"frame {BAD} has no data on disk" in message
    key = os.path.relpath(chunk, store).replace(os.sep, "/")
    assert f"chunk '{key}' is missing" in message
    assert "Copy it again or re-export the frame" in message
    with pytest.raises(StackReadError, match=f"frame {BAD} has no data"):
        select(stack).data.compute()  # the whole video, as tracking reads it
    assert _hashes(store) == before


def test_missing_chunk_of_a_plain_zarr_array_names_frame_and_plane(tmp_path):
    movie = _movie((3, 4, 8, 8))
    store = tmp_path / "plain.zarr"
    arr = zarr.open(str(store), mode="w", shape=movie.shape, chunks=(1, 1, 8, 8), dtype=movie.dtype)
    arr[...] = movie
    key = arr.metadata.encode_chunk_key((1, 2, 0, 0)) if ZARR3 else arr._chunk_key((1, 2, 0, 0))
    store.joinpath(*re.split(r"/", key)).unlink()
    stack = open_stack(store, axes="TZYX")
    np.testing.assert_array_equal(stack.data[1, 1].compute(), movie[1, 1])
    with pytest.raises(StackReadError, match=re.escape(f"zarr store '{store}': frame 1 (z=2) has no data")):
        stack.data[1].compute()
    # the volume read along Z names the plane too
    with pytest.raises(StackReadError, match=r"frame 1 \(z=2\)"):
        select(stack, along="Z", t=1).data.compute()


def test_label_images_may_skip_empty_chunks(tmp_path):
    """OME-Zarr labels (image-label): an absent chunk is background, not an incomplete store."""
    labels = np.zeros((4, 8, 8), np.uint32)
    labels[1, 2:5, 2:5] = 7
    path = tmp_path / "labels.ome.zarr"
    with ZarrLabelsWriter(path, labels.shape) as writer:
        for t, frame in enumerate(labels):
            writer.write(t, frame)
    np.testing.assert_array_equal(open_stack(path).data.compute(), labels)


# --------------------------------------------------------------------------- corrupt chunks


@pytest.mark.parametrize("zarr_format, separator", ZARR_LAYOUTS)
def test_corrupt_zarr_chunk_is_an_error_naming_store_and_frame(tmp_path, zarr_format, separator):
    movie = _movie()
    store = tmp_path / "movie.ome.zarr"
    _write_ome_zarr(store, movie, zarr_format, separator)
    chunk = _chunk_file(store, zarr_format, (BAD, 0, 0), separator)
    chunk.write_bytes(b"\x00garbage, not a compressed chunk\xff" * 8)
    before = _hashes(store)

    stack = open_stack(store)
    np.testing.assert_array_equal(stack.data[BAD - 1].compute(), movie[BAD - 1])
    with pytest.raises(StackReadError) as info:
        stack.data[BAD].compute()
    message = str(info.value)
    assert f"zarr store '{store}' (array '0'): frame {BAD} is corrupt" in message
    key = os.path.relpath(chunk, store).replace(os.sep, "/")
    assert f"chunk '{key}' cannot be decoded" in message
    assert "Copy it again or re-export the frame" in message
    # a read spanning several frames still names the damaged one
    with pytest.raises(StackReadError, match=f"frame {BAD} is corrupt"):
        stack.data.compute()
    np.testing.assert_array_equal(stack.data[BAD + 1].compute(), movie[BAD + 1])
    assert _hashes(store) == before


# --------------------------------------------------------------------------- named pipes


def _call_with_timeout(fn, *args, timeout=10.0):
    """Run fn(*args) in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout)
    return thread, box, time.perf_counter() - start


def _unblock(fifo: Path) -> None:
    """Release a reader stuck opening `fifo` (only needed when the code under test failed)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


@needs_fifo
@pytest.mark.parametrize("name", ["pipe", "movie.tif", "movie.ome.zarr", "frame.png"])
def test_fifo_input_is_refused_without_opening_it(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    thread, box, seconds = _call_with_timeout(open_stack, fifo)
    if thread.is_alive():
        _unblock(fifo)
        pytest.fail(f"open_stack blocked on the FIFO '{fifo}'")
    assert seconds < 5
    error = box.get("error")
    assert isinstance(error, StackReadError), box
    assert str(error) == (f"input '{fifo}' is not a regular file (it is a named pipe/FIFO): "
                          "pass an image file, a folder of frames or a Zarr store")


@needs_fifo
def test_fifo_among_frame_files_is_refused_by_name(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(4):
        if t == 2:
            os.mkfifo(frames / f"t{t:03d}.tif")
        else:
            tifffile.imwrite(frames / f"t{t:03d}.tif", np.full((6, 6), t, np.uint16))
    fifo = frames / "t002.tif"
    sources = [frames, str(frames / "t*.tif"), sorted(frames.iterdir())]
    for source in sources:  # a folder, a glob, an explicit list
        thread, box, _ = _call_with_timeout(open_stack, source)
        if thread.is_alive():
            _unblock(fifo)
            pytest.fail(f"open_stack({source!r}) blocked on the FIFO")
        error = box.get("error")
        assert isinstance(error, StackReadError), (source, box)
        assert "t002.tif" in str(error) and "named pipe/FIFO" in str(error)


def test_symlink_to_a_regular_file_is_fine(tmp_path):
    movie = _movie((3, 8, 8))
    tifffile.imwrite(tmp_path / "real.tif", movie, photometric="minisblack")
    link = tmp_path / "link.tif"
    try:
        link.symlink_to(tmp_path / "real.tif")
    except OSError:  # pragma: no cover - no symlinks on this file system
        pytest.skip("cannot create symlinks here")
    np.testing.assert_array_equal(open_stack(link).data.compute(), movie)
    tifffile.imwrite(tmp_path / "frame.tif", movie[1])
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(3):
        (folder / f"t{t}.tif").symlink_to(tmp_path / "frame.tif")
    np.testing.assert_array_equal(open_stack(folder).data.compute(), np.stack([movie[1]] * 3))


# --------------------------------------------------------------------------- dtypes

BOOL_HINT = ("pass integer (uint8, uint16, int32, ...) or floating-point (float32, float64) "
             "intensities; for a mask use it as a prompt (masks=")


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 8, 8), bool), "cannot segment an array of dtype bool: " + BOOL_HINT),
    (np.zeros((3, 8, 8), np.complex64), "take the magnitude first, e.g. np.abs(stack)"),
    (np.zeros((3, 8, 8), object), "cannot segment an array of dtype object"),
    (np.zeros((3, 8, 8), "U3"), "cannot segment an array of dtype <U3"),
])
def test_non_intensity_arrays_are_refused_when_opening(array, message):
    with pytest.raises(StackReadError, match=re.escape(message)):
        open_stack(array)
    with pytest.raises(StackReadError, match=re.escape(message)):
        open_stack([frame for frame in array])  # a list of frames too


def test_numeric_dtypes_are_accepted():
    for dtype in (np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64):
        assert open_stack(np.zeros((2, 8, 8), dtype)).dtype == dtype


def test_bool_and_complex_files_are_refused_when_opening(tmp_path):
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((3, 8, 8), bool))
    with pytest.raises(StackReadError, match=re.escape(
            f"cannot segment '{tmp_path / 'mask.tif'}': its pixels have dtype bool")):
        open_stack(tmp_path / "mask.tif")
    tifffile.imwrite(tmp_path / "fft.tif", np.zeros((3, 8, 8), np.complex64), photometric="minisblack")
    with pytest.raises(StackReadError, match="dtype complex64.*take the magnitude first"):
        open_stack(tmp_path / "fft.tif")
    store = tmp_path / "mask.zarr"
    arr = zarr.open(str(store), mode="w", shape=(3, 8, 8), chunks=(1, 8, 8), dtype=bool)
    arr[...] = True
    with pytest.raises(StackReadError, match=re.escape(f"cannot segment '{store}': its pixels have dtype bool")):
        open_stack(store)


def test_segment_stack_refuses_a_bool_array_before_building_a_model(tmp_path):
    from napari_sam2 import segment_stack

    start = time.perf_counter()
    with pytest.raises(StackReadError, match="cannot segment an array of dtype bool"):
        # a model that cannot be built: reaching it would raise something else
        segment_stack(np.zeros((3, 16, 16), bool), points=np.array([[0, 8, 8]]),
                      model="no-such-model", checkpoint=tmp_path / "missing.pt", device="cpu",
                      progress=False)
    assert time.perf_counter() - start < 5


# --------------------------------------------------------------------------- select advice


def test_z_advice_names_python_and_cli_options():
    stack = open_stack(np.zeros((2, 12, 8, 8), np.uint16), axes="TZYX")
    with pytest.raises(ValueError) as info:
        select(stack)
    message = str(info.value)
    assert "the stack has 12 Z planes" in message
    assert "z=0..11 (CLI: --z N)" in message
    assert "z_project='max' (CLI: --z-project max)" in message
    assert "along='Z' (CLI: --along Z)" in message
