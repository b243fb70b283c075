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


def _widget(make_napari_viewer, movie, checkpoint, image=None, **image_kwargs):
    from napari_sam2._widget import SAM2Widget

    viewer = make_napari_viewer()
    viewer.add_image(movie.image if image is None else image, name="movie", **image_kwargs)
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM2")
    assert widget.image_layer.name == "movie"
    widget.checkpoint_edit.setText(str(checkpoint))
    widget.device_combo.setCurrentText("cpu")
    widget.size_spin.setValue(128)
    assert widget.ensure_layers()
    return viewer, widget


def settle(widget, timeout: float = 120.0) -> None:
    """Let the worker finish and the viewer show what it sent."""
    from heartbeat import wait_idle

    wait_idle(widget, timeout)


def _click(widget, t, y, x, obj=1, positive=True):
    widget.labels_layer.selected_label = obj
    if widget.positive != positive:
        widget.toggle_positive()
    widget.points_layer.add([[t, y, x]])


def _paint(widget, t, obj, sl=(slice(20, 36), slice(24, 40))):
    """Paint label ``obj`` on frame t, select it and use it as the object's mask prompt."""
    widget.labels_layer.data[(t, *sl)] = obj
    widget.labels_layer.selected_label = obj
    widget.viewer.dims.set_current_step(0, t)
    return widget.use_painted_mask()


def _frames_shown(widget, during=None):
    """Record the frames the worker shows (``during(t)`` is called after each is written)."""
    seen = []
    show = widget.show_frame

    def spy(t, labels):
        show(t, labels)
        seen.append(t)
        if during is not None:
            during(t)

    widget.show_frame = spy
    return seen


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    contrib = manifest.contributions
    assert [w.display_name for w in contrib.widgets] == ["SAM2 video segmentation"]
    assert {w.command for w in contrib.writers} == {"napari-sam2.write_ome_zarr", "napari-sam2.write_ctc",
                                                    "napari-sam2.write_geff"}
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


def test_prompts_show_mask_and_propagation_fills_frames(make_napari_viewer, movie, random_checkpoint, tmp_path):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    labels = widget.labels_layer
    seen = _frames_shown(widget)
    _click(widget, 1, 20, 20, obj=1)
    settle(widget)
    assert seen == [1]  # the click's frame is shown at once, before any propagation
    annotator = widget.annotator
    predictor = annotator._predictor
    assert predictor is not None and predictor.add_all_frames_to_correct_as_cond  # loaded at the first click
    assert "loaded on cpu in fp32" in widget.status.text() or "updated" in widget.status.text()
    state = annotator._state
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
    settle(widget)
    assert sorted(state.obj_ids) == [1, 2]
    assert set(annotator._applied) == {(1, 1), (3, 2)}

    seen.clear()
    task = widget.propagate(direction="forward", start=0, end=4)
    assert task is not None
    settle(widget)
    assert seen == [1, 2, 3, 4]  # from the first prompted frame to the end, one by one
    assert task.done == task.total == 4 and widget.progress.value() == 4
    for t in seen:
        assert set(np.unique(labels.data[t])) <= {0, 1, 2}
    assert annotator._predictor is predictor  # reused, not rebuilt
    assert [r.obj_id for r in widget.objects.rows] == [1, 2]
    assert all(len(r.scores) == 5 for r in widget.objects.rows)

    # refinement: a click on another frame, then propagate again
    _click(widget, 4, 10, 10, obj=1)
    widget.propagate(direction="both")
    settle(widget)
    assert (4, 1) in annotator._applied

    widget.make_tracks()
    settle(widget)
    video = np.asarray(labels.data).astype(np.uint32)
    for fmt, name in (("zarr", "m.ome.zarr"), ("tiff", "m.tif"), ("ctc", "m_RES")):
        assert widget.export(tmp_path / name, fmt) is not None
        settle(widget)
        assert (tmp_path / name).exists()
    from napari_sam2.io import open_stack

    assert np.array_equal(np.asarray(open_stack(tmp_path / "m.ome.zarr").data), video)
    assert np.array_equal(np.asarray(open_stack(tmp_path / "m.tif").data).reshape(video.shape), video)
    assert np.array_equal(np.asarray(open_stack(sorted((tmp_path / "m_RES").glob("mask*.tif"))).data).reshape(video.shape), video)

    # another image size: a new model, and every prompt is sent to its new session
    widget.size_spin.setValue(256)
    _click(widget, 2, 30, 30, obj=1)
    settle(widget)
    assert annotator._predictor is not predictor and annotator._predictor.image_size == 256
    assert set(annotator._applied) == {(1, 1), (3, 2), (4, 1), (2, 1)}
    assert sorted(annotator._state.obj_ids) == [1, 2]

    widget.clear_object(2)
    settle(widget)
    assert 2 not in annotator._state.obj_ids and not (labels.data == 2).any()
    assert len(widget.boxes_layer.data) == 0
    widget.reset()
    settle(widget)
    assert not labels.data.any() and len(widget.points_layer.data) == 0 and not annotator._state.obj_ids

    # tracks from painted masklets: one track per label, (track_id, t, y, x)
    labels.data[:, 10:20, 30:40] = 7
    labels.data[2:, 40:50, 10:20] = 3
    widget.make_tracks()
    settle(widget)
    tracks = viewer.layers["SAM2 tracks"]
    assert sorted(map(tuple, tracks.data[:, :2].astype(int).tolist())) == sorted(
        [(7, t) for t in range(5)] + [(3, t) for t in range(2, 5)])
    assert np.allclose(tracks.data[tracks.data[:, 0] == 7][:, 2:], [14.5, 34.5])


def test_cancel_stops_within_a_frame(make_napari_viewer, movie, random_checkpoint):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _click(widget, 0, 20, 20, obj=1)
    settle(widget)
    seen = _frames_shown(widget, during=lambda t: widget.cancel())
    task = widget.propagate(direction="forward", start=0, end=4)
    settle(widget)
    assert 1 <= len(seen) <= 2 and task.cancelled
    assert "cancelled" in widget.status.text() and "what was done is kept" in widget.status.text()
    assert widget.propagate_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_bad_checkpoint_is_a_notification(make_napari_viewer, movie, tmp_path, monkeypatch):
    import napari_sam2._widget as w

    messages = []
    monkeypatch.setattr(w, "_notify_error", messages.append)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    viewer, widget = _widget(make_napari_viewer, movie, bad)
    _click(widget, 0, 20, 20, obj=1)  # no traceback: the click stays, no mask appears
    settle(widget)
    assert widget.annotator._predictor is None
    assert len(messages) == 1
    assert "could not load" in messages[0] and "choose the checkpoint of sam2.1_hiera_tiny or another model" in messages[0]
    assert not widget.labels_layer.data.any() and len(widget.points_layer.data) == 1


def test_4d_image_propagates_along_the_chosen_axis(make_napari_viewer):
    from napari_sam2._widget import SAM2Widget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 6, 32, 40), np.uint16), name="tzyx", scale=(1, 2, 0.5, 0.5))
    widget = SAM2Widget(viewer)
    assert widget.axis_combo.count() == 2
    widget.axis_combo.setCurrentIndex(1)  # propagate along Z, time taken at the slice in view
    viewer.dims.set_current_step(0, 1)
    assert widget.ensure_layers()
    view = widget.annotator.view
    assert view.axis == 1 and view.fixed == {0: 1}
    assert view.video.shape == (6, 32, 40) and view.n_frames == 6
    labels = widget.labels_layer
    assert labels.data.shape == (2, 6, 32, 40)
    assert tuple(labels.scale) == (1, 2, 0.5, 0.5) and tuple(widget.points_layer.scale) == (1, 2, 0.5, 0.5)
    assert tuple(labels.axis_labels) == ("t", "z", "y", "x")
    assert view.frame_index(4) == (1, 4)
    assert view.frame_of([1, 4, 3, 3]) == 4 and view.frame_of([0, 4, 3, 3]) is None


def test_plugin_registered_with_napari(make_napari_viewer, tmp_path, movie):
    from napari_sam2._widget import SAM2Widget
    from napari_sam2._writer import write_ome_zarr

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam2", "SAM2 video segmentation")
    assert isinstance(widget, SAM2Widget)
    layers = viewer.open_sample("napari-sam2", "timelapse")
    assert [lyr.name for lyr in layers] == ["synthetic time-lapse", "ground truth"]
    assert widget.image_layer.name == "synthetic time-lapse"
    (path,) = write_ome_zarr(str(tmp_path / "img.ome.zarr"), movie.labels.astype(np.uint32), {})
    (opened,) = viewer.open(path, plugin="napari-sam2")
    assert opened.data.shape == movie.labels.shape and hasattr(opened.data, "dask")
