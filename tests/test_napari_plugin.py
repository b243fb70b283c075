"""napari plugin: manifest, reader, writers, sample data and the SAM2 dock widget (under Xvfb)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sam2.synthetic import make_timelapse  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_sam2" / "napari.yaml"


@pytest.fixture
def movie():
    return make_timelapse(n_frames=5, shape=(64, 64), n_cells=2, divide=False, enter=False, seed=1)


def _widget(make_napari_viewer, movie, checkpoint):
    from napari_sam2._widget import SAM2Widget

    viewer = make_napari_viewer()
    viewer.add_image(movie.image, name="movie")
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM2")
    widget.image_combo.setCurrentText("movie")
    widget.checkpoint_edit.setText(str(checkpoint))
    widget.device_combo.setCurrentText("cpu")
    widget.size_spin.setValue(128)
    assert widget.ensure_layers()
    return viewer, widget


def _click(widget, t, y, x, obj=1, positive=True):
    widget.labels_layer.selected_label = obj
    if widget.positive != positive:
        widget.toggle_positive()
    widget.points_layer.add([[t, y, x]])


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    contrib = manifest.contributions
    assert [w.display_name for w in contrib.widgets] == ["SAM2 video segmentation"]
    assert {w.command for w in contrib.writers} == {"napari-sam2.write_ome_zarr", "napari-sam2.write_ctc"}
    assert contrib.readers and contrib.sample_data
    for cmd in contrib.commands:  # every command resolves to an importable callable
        assert callable(_resolve(cmd.python_name))


def _resolve(python_name):
    import importlib

    module, attr = python_name.split(":")
    return getattr(importlib.import_module(module), attr)


def test_sample_data():
    from napari_sam2._sample_data import make_sample_data

    (image, _, kind_i), (labels, _, kind_l) = make_sample_data(n_frames=4, shape=(32, 32))
    assert kind_i == "image" and kind_l == "labels" and image.shape == labels.shape == (4, 32, 32)


def test_reader_and_writers_round_trip(tmp_path, movie):
    from napari_sam2._reader import get_reader
    from napari_sam2._writer import write_ctc_folder, write_ome_zarr
    from napari_sam2.io import open_stack, read_ctc_tracks

    labels = movie.labels.astype(np.uint32)
    (out,) = write_ome_zarr(str(tmp_path / "lab.ome.zarr"), labels, {"name": "lab"})
    reader = get_reader(out)
    assert reader is not None
    ((data, meta, kind),) = reader(out)
    assert np.array_equal(np.asarray(data), labels) and meta["name"] == "lab"
    (ctc,) = write_ctc_folder(str(tmp_path / "01_RES"), labels, {})
    assert np.array_equal(np.asarray(open_stack(sorted(Path(ctc).glob("mask*.tif"))).data), labels)
    assert read_ctc_tracks(Path(ctc) / "res_track.txt")
    # a folder of frames opens lazily; a random folder / file is not claimed
    assert get_reader(ctc) is not None
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "nothing.txt")) is None


def test_prompts_show_mask_and_propagation_fills_frames(make_napari_viewer, qtbot, movie, random_checkpoint, tmp_path):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    labels = widget.labels_layer
    writes = []
    write = widget._write_frame
    widget._write_frame = lambda t, frame: (writes.append(t), write(t, frame))
    _click(widget, 1, 20, 20, obj=1)
    assert writes == [1]  # the click's frame is shown at once, before any propagation
    assert widget._predictor is not None  # loaded at the first click
    predictor = widget._predictor
    assert predictor.add_all_frames_to_correct_as_cond
    state = widget._session.state
    assert state.obj_ids == [1]
    assert widget.points_layer.features["obj_id"].tolist() == [1]
    assert widget.points_layer.features["positive"].tolist() == [True]
    # the 't' key of the points layer toggles positive / negative clicks
    from app_model.types import KeyBinding

    widget.points_layer.keymap[KeyBinding.from_str("T")](widget.points_layer)
    assert widget.positive is False and widget.points_layer.feature_defaults["positive"].tolist() == [False]
    widget.toggle_positive()
    _click(widget, 1, 30, 40, obj=1, positive=False)
    assert widget.points_layer.features["positive"].tolist() == [True, False]
    # a box for object 2 on frame 3
    labels.selected_label = 2
    widget.boxes_layer.add_rectangles(np.array([[3, 35, 35], [3, 35, 55], [3, 55, 55], [3, 55, 35]], float))
    assert widget.boxes_layer.features["obj_id"].tolist() == [2]
    assert sorted(state.obj_ids) == [1, 2]
    assert set(widget._applied) == {(1, 1), (3, 2)}

    seen = []
    worker = widget.propagate(direction="forward", start=0, end=4)
    assert worker is not None
    worker.yielded.connect(lambda item: seen.append((item[0], labels.data[item[0]].copy())))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert [t for t, _ in seen] == [1, 2, 3, 4]  # from the first prompted frame to the end, one by one
    for t, frame in seen:
        assert np.array_equal(labels.data[t], frame)  # written as it came
        assert set(np.unique(frame)) <= {0, 1, 2}
    assert widget.progress.value() == 4
    assert predictor is widget.predictor()  # reused, not rebuilt

    # refinement: a click on another frame, then propagate again
    _click(widget, 4, 10, 10, obj=1)
    assert (4, 1) in widget._applied
    worker = widget.propagate(direction="both")
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)

    tracks = widget.make_tracks()
    if tracks is not None:
        assert tracks.data.shape[1] == 4
    video = np.asarray(labels.data).astype(np.uint32)
    for fmt, name in (("ome-zarr", "m.ome.zarr"), ("tiff", "m.tif"), ("ctc", "m_RES")):
        out = widget.export(tmp_path / name, fmt)
        assert out is not None and out.exists()
    from napari_sam2.io import open_stack

    assert np.array_equal(np.asarray(open_stack(tmp_path / "m.ome.zarr").data), video)
    assert np.array_equal(np.asarray(open_stack(tmp_path / "m.tif").data).reshape(video.shape), video)
    assert np.array_equal(np.asarray(open_stack(sorted((tmp_path / "m_RES").glob("mask*.tif"))).data).reshape(video.shape), video)

    # another image size: a new model, and every prompt is sent to its new session
    widget.size_spin.setValue(256)
    _click(widget, 2, 30, 30, obj=1)
    assert widget._predictor is not predictor and widget._predictor.image_size == 256
    assert set(widget._applied) == {(1, 1), (3, 2), (4, 1), (2, 1)}
    assert sorted(widget._session.state.obj_ids) == [1, 2]

    widget.clear_object(2)
    assert 2 not in widget._session.state.obj_ids and not (labels.data == 2).any()
    assert widget.boxes_layer.data == [] or len(widget.boxes_layer.data) == 0
    widget.reset()
    assert not labels.data.any() and len(widget.points_layer.data) == 0

    # tracks from painted masklets: one track per label, (track_id, t, y, x)
    labels.data[:, 10:20, 30:40] = 7
    labels.data[2:, 40:50, 10:20] = 3
    tracks = widget.make_tracks()
    assert tracks.name == "SAM2 tracks"
    assert sorted(map(tuple, tracks.data[:, :2].astype(int).tolist())) == sorted(
        [(7, t) for t in range(5)] + [(3, t) for t in range(2, 5)])
    assert np.allclose(tracks.data[tracks.data[:, 0] == 7][:, 2:], [14.5, 34.5])


def test_cancel_stops_within_a_frame(make_napari_viewer, qtbot, movie, random_checkpoint):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _click(widget, 0, 20, 20, obj=1)
    seen = []
    worker = widget.propagate(direction="forward", start=0, end=4)

    def on_frame(item):
        seen.append(item[0])
        widget.cancel()

    worker.yielded.connect(on_frame)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert 1 <= len(seen) <= 2
    assert widget.propagate_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_bad_checkpoint_is_a_notification(make_napari_viewer, movie, tmp_path, monkeypatch):
    import napari_sam2._widget as w

    messages = []
    monkeypatch.setattr(w, "_notify_error", messages.append)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    viewer, widget = _widget(make_napari_viewer, movie, bad)
    _click(widget, 0, 20, 20, obj=1)  # no traceback: the click stays, no mask appears
    assert widget._predictor is None
    assert len(messages) == 1
    assert "could not load" in messages[0] and "choose the checkpoint of sam2.1_hiera_tiny or another model" in messages[0]
    assert not widget.labels_layer.data.any()


def test_4d_image_propagates_along_the_chosen_axis(make_napari_viewer):
    from napari_sam2._widget import SAM2Widget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 6, 32, 40), np.uint16), name="tzyx")
    widget = SAM2Widget(viewer)
    assert widget.axis_combo.count() == 2
    widget.axis_combo.setCurrentIndex(1)  # propagate along Z, time taken at the slice in view
    viewer.dims.set_current_step(0, 1)
    assert widget.ensure_layers()
    session = widget._session
    assert session.axis == 1 and session.fixed == {0: 1}
    assert session.video.shape == (6, 32, 40) and session.n_frames == 6
    assert widget.labels_layer.data.shape == (2, 6, 32, 40)
    assert session.frame_index(4) == (1, 4)
    assert session.frame_of([1, 4, 3, 3]) == 4 and session.frame_of([0, 4, 3, 3]) is None


def test_plugin_registered_with_napari(make_napari_viewer, tmp_path, movie):
    from napari_sam2._widget import SAM2Widget
    from napari_sam2._writer import write_ome_zarr

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam2", "SAM2 video segmentation")
    assert isinstance(widget, SAM2Widget)
    layers = viewer.open_sample("napari-sam2", "timelapse")
    assert [lyr.name for lyr in layers] == ["synthetic time-lapse", "ground truth"]
    assert widget.image_combo.currentText() == "synthetic time-lapse"
    (path,) = write_ome_zarr(str(tmp_path / "img.ome.zarr"), movie.labels.astype(np.uint32), {})
    (opened,) = viewer.open(path, plugin="napari-sam2")
    assert opened.data.shape == movie.labels.shape and hasattr(opened.data, "dask")
