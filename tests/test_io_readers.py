"""Readers: every source becomes a lazy Stack with the right axes, or a clear error."""

from __future__ import annotations

import os
import pickle
import time

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_sam2.io import Stack, StackReadError, frame_folder, open_stack, select, tiff_source

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
rng = np.random.default_rng(42)


def _movie(shape, dtype=np.uint16):
    return rng.integers(0, 4000, size=shape).astype(dtype)


# --------------------------------------------------------------------------- TIFF


@pytest.fixture(params=["zarr-store", "pages"])
def tiff_backend(request, monkeypatch):
    """Run a TIFF test through tifffile's zarr store and through the page-by-page fallback."""
    if request.param == "zarr-store" and not tiff_source._zarr_store_usable():
        pytest.skip("tifffile's zarr store needs zarr-python >= 3")
    monkeypatch.setattr(tiff_source, "USE_ZARR_STORE", request.param == "zarr-store")
    return request.param


def test_plain_multipage_tiff_pages_become_time(tmp_path, tiff_backend):
    movie = _movie((7, 20, 30))
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for frame in movie:  # one page per write, no shape metadata: a "plain" multipage file
            tif.write(frame, metadata=None)
    stack = open_stack(path)
    assert isinstance(stack, Stack)
    assert isinstance(stack.data, da.Array)
    assert stack.axes == "TYX"
    assert stack.shape == (7, 20, 30)
    assert stack.path == path
    np.testing.assert_array_equal(stack.data.compute(), movie)
    assert stack.metadata["axes_guessed"] is True


def test_tifffile_shaped_tiff(tmp_path, tiff_backend):
    movie = _movie((5, 16, 16))
    tifffile.imwrite(tmp_path / "shaped.tif", movie)
    stack = open_stack(tmp_path / "shaped.tif")
    assert stack.axes == "TYX"
    np.testing.assert_array_equal(stack.data[2].compute(), movie[2])


def test_imagej_hyperstack_tzcyx(tmp_path, tiff_backend):
    movie = _movie((4, 3, 2, 16, 20))
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TZCYX", "spacing": 2.5,
                                                          "unit": "um", "finterval": 10.0},
                     resolution=(1 / 0.5, 1 / 0.5))
    stack = open_stack(path)
    assert stack.axes == "TZCYX"
    assert stack.shape == movie.shape
    assert stack.metadata["format"] == "imagej-tiff"
    assert stack.metadata["axes_guessed"] is False
    sizes = stack.metadata["physical_pixel_sizes"]
    assert sizes["Z"] == pytest.approx(2.5) and sizes["X"] == pytest.approx(0.5)
    assert stack.metadata["time_interval"] == pytest.approx(10.0)
    np.testing.assert_array_equal(stack.data.compute(), movie)

    video = select(stack, channel=1, z=2)
    assert video.axes == "TYX" and video.shape == (4, 16, 20)
    np.testing.assert_array_equal(video.data.compute(), movie[:, 2, 1])

    projected = select(stack, channel=0, z_project="max")
    assert isinstance(projected.data, da.Array)
    np.testing.assert_array_equal(projected.data.compute(), movie[:, :, 0].max(axis=1))


def test_ome_tiff_axes_and_pixel_sizes(tmp_path, tiff_backend):
    movie = _movie((3, 2, 24, 24))  # written as T C Y X
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, movie, metadata={"axes": "TCYX", "PhysicalSizeX": 0.2,
                                            "PhysicalSizeY": 0.2, "TimeIncrement": 5.0})
    stack = open_stack(path)
    assert stack.metadata["format"] == "ome-tiff"
    assert stack.axes == "TCYX"
    assert stack.metadata["physical_pixel_sizes"] == {"Y": 0.2, "X": 0.2}
    np.testing.assert_array_equal(select(stack, channel=1).data.compute(), movie[:, 1])


def test_rgb_tiff_samples_become_channels(tmp_path, tiff_backend):
    rgb = _movie((3, 16, 16, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    stack = open_stack(tmp_path / "rgb.tif")
    assert stack.axes == "TCYX"
    np.testing.assert_array_equal(stack.data.compute(), rgb.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("compression", ["zstd", "lzw", "deflate"])
def test_compressed_tiff(tmp_path, compression, tiff_backend):
    movie = _movie((6, 32, 32))
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, movie, compression=compression)
    stack = open_stack(path)
    assert stack.axes == "TYX"
    assert stack.metadata["compression"] != "none"
    np.testing.assert_array_equal(stack.data[3].compute(), movie[3])
    np.testing.assert_array_equal(stack.data.compute(), movie)


@pytest.mark.parametrize("kind", ["plain", "zstd", "imagej", "ome", "pages"])
def test_truncated_tiff_is_a_clear_error(tmp_path, kind, tiff_backend):
    movie = _movie((8, 64, 64))
    path = tmp_path / f"cut_{kind}.tif"
    if kind == "pages":
        with tifffile.TiffWriter(path) as tif:
            for frame in movie:
                tif.write(frame, metadata=None, compression="zlib")
    else:
        kwargs = {"plain": {}, "zstd": {"compression": "zstd"}, "imagej": {"imagej": True},
                  "ome": {"ome": True}}[kind]
        tifffile.imwrite(path, movie, **kwargs)
    with open(path, "r+b") as fh:  # a file cut in half, like an interrupted copy
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(StackReadError, match="corrupt or truncated") as info:
        open_stack(path).data.compute()
    assert path.name in str(info.value)


def test_not_a_tiff_and_tiny_file(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff file at all" * 10)
    with pytest.raises(StackReadError, match="junk.tif"):
        open_stack(junk)
    tiny = tmp_path / "tiny.tif"
    tiny.write_bytes(b"II*\x00")
    with pytest.raises(StackReadError, match="corrupt or truncated"):
        open_stack(tiny)


def test_corrupt_compressed_pixels_fail_clearly_when_read(tmp_path, tiff_backend):
    movie = _movie((5, 32, 32))
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, movie, compression="zstd")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset:offset + count] = bytes(count)  # zeroed compressed data
    path.write_bytes(bytes(raw))
    stack = open_stack(path)
    np.testing.assert_array_equal(stack.data[0].compute(), movie[0])  # other frames still fine
    with pytest.raises(StackReadError, match="damaged.tif.*corrupt or truncated"):
        stack.data[2].compute()


def test_big_sparse_tiff_opens_fast_and_reads_one_frame(tmp_path, monkeypatch, tiff_backend):
    path = tmp_path / "big.tif"
    shape = (3000, 512, 512)  # 1.5 GiB on paper, a sparse file on disk
    tifffile.imwrite(path, shape=shape, dtype=np.uint16)
    start = time.perf_counter()
    stack = open_stack(path)
    assert time.perf_counter() - start < 2.0
    assert isinstance(stack.data, da.Array)
    assert stack.shape == shape
    assert stack.data.chunksize == (1, 512, 512)  # one chunk per plane
    reads = []
    real_getitem = tiff_source._TiffSeriesArray.__getitem__
    monkeypatch.setattr(tiff_source._TiffSeriesArray, "__getitem__",
                        lambda self, key: reads.append(key) or real_getitem(self, key))
    assert stack.data[1234].compute().shape == (512, 512)
    assert len(reads) == 1 and reads[0][0] == slice(1234, 1235)  # that plane only


def test_tiff_stack_graph_is_picklable(tmp_path, tiff_backend):
    movie = _movie((3, 8, 8))
    tifffile.imwrite(tmp_path / "p.tif", movie, compression="zlib", photometric="minisblack")
    data = open_stack(tmp_path / "p.tif").data
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(data)).compute(), movie)


def test_axes_override_on_tiff(tmp_path, tiff_backend):
    volume = _movie((5, 16, 16))
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    stack = open_stack(tmp_path / "vol.tif", axes="ZYX")
    assert stack.axes == "ZYX"
    video = select(stack)  # no T: the volume is a video along Z
    assert video.axes == "TYX" and video.metadata["video_axis"] == "Z"
    np.testing.assert_array_equal(video.data.compute(), volume)


# --------------------------------------------------------------------------- frame folders


def test_ctc_folder_unpadded_names_in_natural_order(tmp_path):
    for t in range(13):  # t0.tif ... t12.tif: plain sorting would put t10 before t2
        tifffile.imwrite(tmp_path / f"t{t}.tif", np.full((8, 10), t, np.uint16))
    (tmp_path / "notes.txt").write_text("not an image")
    stack = open_stack(tmp_path)
    assert stack.axes == "TYX" and stack.shape == (13, 8, 10)
    assert stack.metadata["format"] == "frames"
    np.testing.assert_array_equal(stack.data[:, 0, 0].compute(), np.arange(13))


def test_ctc_padded_folder_and_glob_choice(tmp_path):
    for t in range(4):
        tifffile.imwrite(tmp_path / f"t{t:03d}.tif", np.full((6, 6), t, np.uint16))
        tifffile.imwrite(tmp_path / f"mask{t:03d}.tif", np.full((6, 6), 10 + t, np.uint16))
    with pytest.raises(StackReadError, match="several image sequences"):
        open_stack(tmp_path)
    masks = open_stack(str(tmp_path / "mask*.tif"))
    np.testing.assert_array_equal(masks.data[:, 0, 0].compute(), [10, 11, 12, 13])
    frames = open_stack([tmp_path / "t003.tif", tmp_path / "t001.tif"])  # explicit order
    np.testing.assert_array_equal(frames.data[:, 0, 0].compute(), [3, 1])


def test_png_folder_grey_and_rgb(tmp_path):
    import imageio.v3 as iio

    grey, rgb = tmp_path / "grey", tmp_path / "rgb"
    grey.mkdir()
    rgb.mkdir()
    frames = _movie((3, 12, 14), np.uint8)
    for t, frame in enumerate(frames):
        iio.imwrite(grey / f"frame_{t}.png", frame)
        iio.imwrite(rgb / f"frame_{t}.png", np.stack([frame, frame // 2, frame // 3], axis=-1))
    stack = open_stack(grey)
    assert stack.axes == "TYX" and stack.dtype == np.uint8
    np.testing.assert_array_equal(stack.data.compute(), frames)
    colour = open_stack(rgb)
    assert colour.axes == "TCYX" and colour.shape == (3, 3, 12, 14)
    np.testing.assert_array_equal(select(colour, channel=1).data.compute(), frames // 2)
    single = open_stack(grey / "frame_0.png")
    assert single.axes == "YX"
    assert select(single).shape == (1, 12, 14)


def test_frame_folder_reads_lazily_one_file_per_frame(tmp_path, monkeypatch):
    for t in range(6):
        tifffile.imwrite(tmp_path / f"t{t:03d}.tif", np.full((5, 5), t, np.uint16))
    calls = []
    real = frame_folder.read_image_file
    monkeypatch.setattr(frame_folder, "read_image_file", lambda p: calls.append(p.name) or real(p))
    stack = open_stack(tmp_path)
    assert calls == ["t000.tif"]  # only the first frame, for shape and dtype
    assert stack.data[4].compute()[0, 0] == 4
    assert calls == ["t000.tif", "t004.tif"]


def test_frame_shape_mismatch_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "t000.tif", np.zeros((8, 8), np.uint16))
    tifffile.imwrite(tmp_path / "t001.tif", np.zeros((8, 9), np.uint16))
    stack = open_stack(tmp_path)
    with pytest.raises(StackReadError, match=r"t001\.tif.*shape \(8, 9\)"):
        stack.data.compute()


def test_empty_folder_missing_path_unknown_type(tmp_path):
    with pytest.raises(StackReadError, match="no image frames"):
        open_stack(tmp_path)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        open_stack(tmp_path / "does_not_exist.tif")
    odd = tmp_path / "movie.xyz"
    odd.write_text("?")
    with pytest.raises(StackReadError, match=r"unknown image file type '\.xyz'"):
        open_stack(odd)
    with pytest.raises(FileNotFoundError, match="no files match"):
        open_stack(str(tmp_path / "nothing*.tif"))


# --------------------------------------------------------------------------- zarr / OME-Zarr


def _zarr_group(path, zarr_format):
    if ZARR3:
        return zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    return zarr.open_group(str(path), mode="w")


def _zarr_array(group, name, data):
    if ZARR3:
        arr = group.create_array(name=name, shape=data.shape, dtype=data.dtype,
                                 chunks=(1,) * (data.ndim - 2) + data.shape[-2:])
    else:
        arr = group.create_dataset(name, shape=data.shape, dtype=data.dtype,
                                   chunks=(1,) * (data.ndim - 2) + data.shape[-2:])
    arr[...] = data
    return arr


def _multiscale(axes, n_levels=2):
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return {
        "name": "img",
        "axes": [{"name": a, "type": kinds[a], **({"unit": "micrometer"} if a in "zyx" else {})}
                 for a in axes],
        "datasets": [{"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * (len(axes) - 2) + [0.3 * 2**i, 0.3 * 2**i]}]}
            for i in range(n_levels)],
    }


def test_plain_zarr_array_guess_and_override(tmp_path):
    movie = _movie((4, 10, 12))
    path = tmp_path / "plain.zarr"
    arr = zarr.open(str(path), mode="w", shape=movie.shape, chunks=(1, 10, 12), dtype=movie.dtype)
    arr[...] = movie
    stack = open_stack(path)
    assert stack.axes == "TYX" and stack.metadata["axes_guessed"] is True
    assert isinstance(stack.data, da.Array)
    np.testing.assert_array_equal(stack.data.compute(), movie)
    assert open_stack(path, axes="ZYX").axes == "ZYX"
    in_memory = open_stack(zarr.open(str(path), mode="r"), axes="TYX")
    np.testing.assert_array_equal(in_memory.data[1].compute(), movie[1])


def test_ome_zarr_04(tmp_path):
    movie = _movie((3, 2, 16, 16))
    path = tmp_path / "img.ome.zarr"
    group = _zarr_group(path, 2)
    _zarr_array(group, "0", movie)
    _zarr_array(group, "1", movie[..., ::2, ::2])
    group.attrs.update({"multiscales": [{"version": "0.4", **_multiscale("tcyx")}]})
    stack = open_stack(path)
    assert stack.axes == "TCYX" and stack.shape == movie.shape  # full resolution level
    assert stack.metadata["format"] == "ome-zarr-0.4"
    assert stack.metadata["physical_pixel_sizes"]["X"] == pytest.approx(0.3)
    np.testing.assert_array_equal(select(stack, channel=1).data.compute(), movie[:, 1])


@pytest.mark.skipif(not ZARR3, reason="OME-Zarr 0.5 is zarr format 3: needs zarr-python >= 3")
def test_ome_zarr_05(tmp_path):
    volume = _movie((2, 5, 16, 16))
    path = tmp_path / "img5.ome.zarr"
    group = _zarr_group(path, 3)
    _zarr_array(group, "0", volume)
    _zarr_array(group, "1", volume[..., ::2, ::2])
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [_multiscale("tzyx")]}})
    stack = open_stack(path)
    assert stack.axes == "TZYX" and stack.metadata["format"] == "ome-zarr-0.5"
    video = select(stack, along="Z", t=1)
    assert video.axes == "TYX" and video.metadata["video_axis"] == "Z"
    np.testing.assert_array_equal(video.data.compute(), volume[1])


def test_zarr_group_without_metadata_is_explained(tmp_path):
    group = _zarr_group(tmp_path / "g.zarr", 2)
    _zarr_array(group, "a", _movie((2, 8, 8)))
    _zarr_array(group, "b", _movie((2, 8, 8)))
    with pytest.raises(StackReadError, match="no OME-Zarr 'multiscales'.*'a'"):
        open_stack(tmp_path / "g.zarr")
    assert open_stack(tmp_path / "g.zarr" / "b").shape == (2, 8, 8)


# --------------------------------------------------------------------------- arrays and axes


def test_numpy_and_dask_arrays_guessing():
    assert open_stack(np.zeros((10, 12))).axes == "YX"
    assert open_stack(np.zeros((5, 10, 12))).axes == "TYX"
    rgb = open_stack(np.zeros((10, 12, 3)))
    assert rgb.axes == "CYX" and rgb.shape == (3, 10, 12)
    assert open_stack(np.zeros((4, 10, 12, 3))).axes == "TCYX"
    assert open_stack(np.zeros((2, 3, 4, 10, 12))).axes == "TZCYX"
    lazy = da.zeros((6, 10, 12), chunks=(1, 10, 12))
    stack = open_stack(lazy)
    assert stack.data is lazy and stack.metadata["axes_guessed"] is True
    assert open_stack(stack) is stack
    frames = open_stack([np.full((4, 5), t) for t in range(3)])
    assert frames.axes == "TYX" and frames.data.chunksize == (1, 4, 5)
    np.testing.assert_array_equal(frames.data[:, 0, 0].compute(), [0, 1, 2])
    with pytest.raises(ValueError, match="different shapes"):
        open_stack([np.zeros((4, 5)), np.zeros((4, 6))])


def test_explicit_axes_are_put_in_canonical_order():
    data = np.arange(2 * 3 * 8 * 9).reshape(8, 9, 2, 3)  # Y X T C
    stack = open_stack(data, axes="yxtc")
    assert stack.axes == "TCYX" and stack.shape == (2, 3, 8, 9)
    np.testing.assert_array_equal(stack.data.compute(), data.transpose(2, 3, 0, 1))


@pytest.mark.parametrize("axes, message", [
    ("TY", r"shape \(4, 8, 9\).*axes='TY'.*one letter per dimension"),
    ("TQX", r"unknown axis letter\(s\) Q"),
    ("TYY", r"repeated"),
    ("TZY", r"must include Y and X"),
])
def test_axes_override_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        open_stack(np.zeros((4, 8, 9)), axes=axes)


# --------------------------------------------------------------------------- select


def test_select_errors_are_explicit():
    stack = open_stack(np.zeros((2, 4, 3, 8, 8), np.uint16), axes="TZCYX")
    with pytest.raises(ValueError, match="has 3 channels"):
        select(stack, channel=3, z=0)
    with pytest.raises(ValueError, match="has 3 channels.*channel=0..2"):
        select(stack, z=0)
    with pytest.raises(ValueError, match="4 Z planes"):
        select(stack, channel=0)
    with pytest.raises(ValueError, match="z=4 is out of range"):
        select(stack, channel=0, z=4)
    with pytest.raises(ValueError, match="either z= .* or z_project="):
        select(stack, channel=0, z=1, z_project="max")
    with pytest.raises(ValueError, match="z_project must be one of"):
        select(stack, channel=0, z_project="median")
    with pytest.raises(ValueError, match="2 time points.*t=0..1"):
        select(stack, channel=0, along="Z")
    with pytest.raises(ValueError, match="t=5 is out of range"):
        select(stack, channel=0, along="Z", t=5)
    single = open_stack(np.zeros((3, 8, 8)), axes="TYX")
    with pytest.raises(ValueError, match="single channel"):
        select(single, channel=2)


def test_select_z_projection_is_lazy_and_correct():
    movie = _movie((3, 5, 8, 8))
    stack = open_stack(movie, axes="TZYX")
    video = select(stack, z_project="max")
    assert isinstance(video.data, da.Array) and video.axes == "TYX"
    np.testing.assert_array_equal(video.data.compute(), movie.max(axis=1))
    mean = select(stack, z_project="mean")
    np.testing.assert_allclose(mean.data.compute(), movie.mean(axis=1), rtol=1e-6)
