"""Writers: round trips, atomic outputs (nothing final after a crash), clear write errors."""

from __future__ import annotations

import errno
import json
import os

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from napari_sam2.io import (
    OutputWriteError,
    ZarrLabelsWriter,
    check_tracks,
    open_stack,
    read_ctc_tracks,
    tracks_from_labels,
    write_ctc,
    write_tiff_labels,
    write_tracks_csv,
)
from napari_sam2.io.ctc import ctc_digits

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3


def _labels(n=5, shape=(24, 32)):
    """(T, Y, X) labels: squares 1 and 2 for all frames, 3 from frame 2 on."""
    out = np.zeros((n,) + shape, np.uint32)
    for t in range(n):
        out[t, 2:8, 2 + t:8 + t] = 1
        out[t, 12:20, 10:18] = 2
        if t >= 2:
            out[t, 14:20, 22:28] = 3
    return out


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- OME-Zarr


def test_zarr_labels_round_trip_and_ngff_metadata(tmp_path):
    labels = _labels()
    path = tmp_path / "labels.ome.zarr"
    with ZarrLabelsWriter(path, labels.shape, scale=(2.0, 0.5, 0.5)) as writer:
        for t in reversed(range(len(labels))):  # any order
            writer.write(t, labels[t])
        assert not path.exists()  # only the temporary exists while writing
        assert writer.temporary_path.exists() and ".partial-" in writer.temporary_path.name
    assert path.exists()
    assert _leftovers(tmp_path) == ["labels.ome.zarr"]

    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["t", "y", "x"]
    assert ms["datasets"][0]["path"] == "0"
    assert "image-label" in attrs
    assert json.loads((path / "0" / ".zarray").read_text())["dimension_separator"] == "/"

    stack = open_stack(path)  # our reader understands what we write
    assert stack.axes == "TYX"
    assert stack.metadata["format"] == "ome-zarr-0.4"
    assert stack.metadata["is_labels"] is True
    assert stack.metadata["physical_pixel_sizes"] == {"Y": 0.5, "X": 0.5}
    assert stack.dtype == np.uint32
    np.testing.assert_array_equal(stack.data.compute(), labels)


@pytest.mark.skipif(not ZARR3, reason="NGFF 0.5 needs zarr-python >= 3")
def test_zarr_labels_ngff_05(tmp_path):
    labels = _labels(3)
    with ZarrLabelsWriter(tmp_path / "l5.zarr", labels.shape, dtype=np.uint16,
                          ngff_version="0.5") as writer:
        for t, frame in enumerate(labels):
            writer.write(t, frame)
    stack = open_stack(tmp_path / "l5.zarr")
    assert stack.metadata["format"] == "ome-zarr-0.5" and stack.axes == "TYX"
    np.testing.assert_array_equal(stack.data.compute(), labels)


def test_zarr_writer_exception_leaves_nothing(tmp_path):
    labels = _labels()
    with pytest.raises(RuntimeError, match="model crashed"):
        with ZarrLabelsWriter(tmp_path / "crash.zarr", labels.shape) as writer:
            writer.write(0, labels[0])
            writer.write(1, labels[1])
            raise RuntimeError("model crashed")
    assert _leftovers(tmp_path) == []


def test_zarr_writer_checks_and_overwrite(tmp_path):
    path = tmp_path / "l.zarr"
    writer = ZarrLabelsWriter(path, (2, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"frame 0 has shape \(8, 9\)"):
        writer.write(0, np.zeros((8, 9)))
    with pytest.raises(IndexError, match="out of range for 2 frames"):
        writer.write(2, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="label 300 does not fit uint8"):
        writer.write(0, np.full((8, 8), 300))
    writer.write(0, np.ones((8, 8)))
    with pytest.warns(RuntimeWarning, match="1 of 2 frames were never written"):
        writer.close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ZarrLabelsWriter(path, (2, 8, 8))
    with ZarrLabelsWriter(path, (1, 4, 4), overwrite=True) as again:
        again.write(0, np.full((4, 4), 7))
    assert open_stack(path).shape == (1, 4, 4)
    assert _leftovers(tmp_path) == ["l.zarr"]


def test_zarr_writer_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    writer = ZarrLabelsWriter(tmp_path / "full.zarr", (3, 8, 8))
    writer.write(0, np.ones((8, 8)))

    def no_space(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(writer._array), "__setitem__", no_space)
    with pytest.raises(OutputWriteError, match=r"full\.zarr.*No space left.*free some disk space"):
        writer.write(1, np.ones((8, 8)))
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize("source", ["numpy", "dask", "generator"])
def test_tiff_labels_round_trip(tmp_path, source):
    labels = _labels().astype(np.uint16)
    data = {"numpy": labels, "dask": da.from_array(labels, chunks=(1, 24, 32)),
            "generator": (f for f in labels)}[source]
    path = tmp_path / "labels.tif"
    write_tiff_labels(path, data, n_frames=len(labels) if source == "generator" else None)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "TYX"
        assert tif.pages[0].compression != 1  # compressed
        np.testing.assert_array_equal(tif.asarray(), labels)
    assert open_stack(path).axes == "TYX"
    assert _leftovers(tmp_path) == ["labels.tif"]


def test_tiff_labels_dtypes(tmp_path):
    labels = _labels()  # uint32, small values: stored as uint16 for ImageJ
    write_tiff_labels(tmp_path / "small.tif", labels)
    assert tifffile.imread(tmp_path / "small.tif").dtype == np.uint16
    big = labels.copy()
    big[3, 0, 0] = 70000
    with pytest.raises(ValueError, match="frame 3: label 70000 does not fit uint16.*imagej=False"):
        write_tiff_labels(tmp_path / "big.tif", big)
    assert not (tmp_path / "big.tif").exists()
    write_tiff_labels(tmp_path / "big.tif", big, imagej=False, compression="zstd")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "big.tif"), big)
    assert sorted(_leftovers(tmp_path)) == ["big.tif", "small.tif"]


def test_tiff_generator_needs_length_and_crash_leaves_nothing(tmp_path):
    labels = _labels().astype(np.uint16)
    with pytest.raises(TypeError, match="pass n_frames"):
        write_tiff_labels(tmp_path / "x.tif", (f for f in labels))

    def crashing():
        yield labels[0]
        yield labels[1]
        raise RuntimeError("GPU fell over")

    with pytest.raises(RuntimeError, match="GPU fell over"):
        write_tiff_labels(tmp_path / "x.tif", crashing(), n_frames=5)
    with pytest.raises(ValueError, match="expected 5 frames but only 2 came"):
        write_tiff_labels(tmp_path / "x.tif", iter(labels[:2]), n_frames=5)
    assert _leftovers(tmp_path) == []


def test_unwritable_destination_names_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "labels.tif"
    with pytest.raises(OutputWriteError, match="not_a_folder/labels.tif"):
        write_tiff_labels(target, _labels())
    with pytest.raises(OutputWriteError, match="not_a_folder"):
        ZarrLabelsWriter(blocker / "l.zarr", (1, 4, 4))
    assert _leftovers(tmp_path) == ["not_a_folder"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions are not enforced for root")
def test_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputWriteError, match="locked.*permissions"):
            write_tracks_csv(locked / "tracks.csv", pd.DataFrame({"a": [1]}))
        with pytest.raises(OutputWriteError, match="locked"):
            write_ctc(locked / "01_RES", _labels())
    finally:
        locked.chmod(0o700)
    assert _leftovers(locked) == []


# --------------------------------------------------------------------------- CTC


def test_ctc_round_trip_and_consistency(tmp_path):
    labels = _labels(n=6)
    out = write_ctc(tmp_path / "01_RES", labels)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"mask{t:03d}.tif" for t in range(6)] + ["res_track.txt"]
    tracks = read_ctc_tracks(out / "res_track.txt")
    assert tracks == [(1, 0, 5, 0), (2, 0, 5, 0), (3, 2, 5, 0)]
    assert tracks == tracks_from_labels(labels)
    mask = tifffile.imread(out / "mask004.tif")
    assert mask.dtype == np.uint16
    np.testing.assert_array_equal(mask, labels[4])
    # the written masks read back as a (T, Y, X) stack
    np.testing.assert_array_equal(open_stack(str(out / "mask*.tif")).data.compute(), labels)
    assert _leftovers(tmp_path) == ["01_RES"]


def test_ctc_with_division_and_streaming(tmp_path):
    labels = np.zeros((4, 16, 16), np.uint16)
    labels[:2, 4:10, 4:10] = 1  # mother, frames 0-1
    labels[2:, 2:6, 2:6] = 2  # daughters from frame 2
    labels[2:, 9:13, 9:13] = 3
    tracks = [(1, 0, 1, 0), (2, 2, 3, 1), (3, 2, 3, 1)]
    out = write_ctc(tmp_path / "res", (f for f in labels), tracks=tracks)
    assert read_ctc_tracks(out / "res_track.txt") == tracks


@pytest.mark.parametrize("tracks, message", [
    ([(1, 0, 1, 0), (2, 2, 3, 1)], "label 3 appears in the masks"),
    ([(1, 0, 2, 0), (2, 2, 3, 1), (3, 2, 3, 1)], "label 1: track table says frames 0..2"),
    ([(1, 0, 1, 0), (2, 2, 3, 9), (3, 2, 3, 1)], "parent 9 is not a listed track"),
    ([(1, 0, 1, 0), (2, 2, 3, 1), (3, 2, 3, 1), (4, 0, 0, 0)], "label 4 is in the track table"),
])
def test_ctc_inconsistent_tracks_write_nothing(tmp_path, tracks, message):
    labels = np.zeros((4, 16, 16), np.uint16)
    labels[:2, 4:10, 4:10] = 1
    labels[2:, 2:6, 2:6] = 2
    labels[2:, 9:13, 9:13] = 3
    with pytest.raises(ValueError, match=message):
        write_ctc(tmp_path / "res", labels, tracks=tracks)
    assert _leftovers(tmp_path) == []


def test_ctc_parent_must_end_before_daughter_begins():
    with pytest.raises(ValueError, match="parent must end before"):
        check_tracks([(1, 0, 3, 0), (2, 3, 5, 1)])


def test_ctc_padding_and_label_range(tmp_path):
    assert ctc_digits(5) == 3 and ctc_digits(1000) == 3 and ctc_digits(1001) == 4
    with pytest.raises(ValueError, match="label 70000 does not fit uint16"):
        write_ctc(tmp_path / "res", np.full((2, 4, 4), 70000, np.uint32))
    assert _leftovers(tmp_path) == []


def test_ctc_1001_frames_use_four_digits(tmp_path):
    frames = (np.full((2, 2), t % 3, np.uint16) for t in range(1001))
    out = write_ctc(tmp_path / "long", frames)
    assert (out / "mask0000.tif").exists() and (out / "mask1000.tif").exists()
    assert not (out / "mask000.tif").exists()


# --------------------------------------------------------------------------- CSV


def test_tracks_csv_round_trip(tmp_path):
    df = pd.DataFrame({"frame": [0, 1], "label": [3, 3], "y": [1.5, 2.5], "x": [4.0, 5.0]})
    path = write_tracks_csv(tmp_path / "tracks.csv", df)
    pd.testing.assert_frame_equal(pd.read_csv(path), df)
    with pytest.raises(FileExistsError):
        write_tracks_csv(path, df)
    write_tracks_csv(path, df.head(1), overwrite=True)
    assert len(pd.read_csv(path)) == 1


def test_tracks_csv_disk_full_leaves_nothing(tmp_path, monkeypatch):
    def half_then_full(self, path, **kwargs):
        with open(path, "w") as fh:
            fh.write("frame,label\n0,")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    with pytest.raises(OutputWriteError, match=r"tracks\.csv': No space left") as info:
        write_tracks_csv(tmp_path / "tracks.csv", pd.DataFrame({"a": [1]}))
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path) == []


def test_permission_denied_is_explained(tmp_path, monkeypatch):
    # what a read-only folder gives a normal user (root ignores permissions, so simulate it)
    def denied(self, file, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(tifffile.TiffWriter, "__init__", denied)
    with pytest.raises(OutputWriteError, match=r"labels\.tif': Permission denied.*permissions"):
        write_tiff_labels(tmp_path / "labels.tif", _labels())
    assert _leftovers(tmp_path) == []
