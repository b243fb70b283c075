"""The widget's tools under a real viewer (Xvfb): mask prompts, automatic seeding, lineage, the object
list, prompts during propagation, and what happens when the image, the viewer or the layers go away."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_napari_plugin import _click, _frames_shown, _paint, _widget, settle  # noqa: E402

from napari_sam2.synthetic import make_timelapse  # noqa: E402


@pytest.fixture
def movie():
    return make_timelapse(n_frames=5, shape=(64, 64), n_cells=2, divide=False, enter=False, seed=1)


def _iou(a, b) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture
def errors(monkeypatch):
    import napari_sam2._widget as w

    messages = []
    monkeypatch.setattr(w, "_notify_error", messages.append)
    return messages


def test_painted_mask_is_a_prompt_and_is_tracked(make_napari_viewer, movie, random_checkpoint, errors):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    seen = _frames_shown(widget)
    _paint(widget, 1, obj=3)
    settle(widget)
    assert seen == [1]
    shown = widget.labels_layer.data[1]
    painted = np.zeros((64, 64), bool)
    painted[20:36, 24:40] = True
    assert _iou(shown == 3, painted) > 0.95  # SAM2 shows a mask prompt as the frame's mask (its corners rounded)
    assert widget.annotator._state.obj_ids == [3] and (1, 3) in widget.annotator._applied
    widget.propagate(direction="forward")
    settle(widget)
    assert seen == [1, 1, 2, 3, 4] and not errors
    # an empty label is refused with a message, nothing is sent
    widget.labels_layer.selected_label = 5
    assert widget.use_painted_mask() is None
    assert errors and "label 5 is not painted on frame" in errors[-1]


def test_segment_all_cells_makes_one_object_per_cell(make_napari_viewer, movie, random_checkpoint, monkeypatch, errors):
    from napari_sam2.predictor import seeding

    a, b, c = (np.zeros((64, 64), bool) for _ in range(3))
    a[5:15, 5:15], b[40:55, 40:55], c[22:34, 26:38] = True, True, True
    calls = []

    def fake_call(self, image):
        calls.append(np.asarray(image).shape)
        return [a, b, c]

    monkeypatch.setattr(seeding.FrameSeeder, "__call__", fake_call)
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 2, obj=1, sl=(slice(20, 36), slice(24, 40)))  # an object already there, covering c
    settle(widget)
    viewer.dims.set_current_step(0, 2)
    widget.points_spin.setValue(8)
    widget.segment_all()
    settle(widget)
    assert calls == [(64, 64)]
    state = widget.annotator._state
    assert sorted(state.obj_ids) == [1, 2, 3]  # c overlaps object 1: not a new cell
    frame = widget.labels_layer.data[2]
    assert _iou(frame == 2, a) > 0.9 and _iou(frame == 3, b) > 0.9
    assert [r.obj_id for r in widget.objects.rows] == [1, 2, 3]
    assert "2 new objects (ids 2..3)" in widget.status.text() and not errors


def test_object_list_selects_jumps_and_deletes(make_napari_viewer, movie, random_checkpoint):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 1, obj=1, sl=(slice(5, 20), slice(5, 20)))
    _paint(widget, 3, obj=2, sl=(slice(40, 55), slice(40, 55)))
    settle(widget)
    table = widget.objects
    assert [(r.obj_id, r.first, r.last) for r in table.rows] == [(1, 1, 1), (2, 3, 3)]
    assert table.table.rowCount() == 2 and table.table.item(1, 1).text() == "3..3"
    assert len(table.rows[0].scores) == 5
    table.table.selectRow(1)
    assert widget.labels_layer.selected_label == 2 and table.selected_id() == 2
    viewer.dims.set_current_step(0, 0)
    table.first_button.click()
    assert viewer.dims.current_step[0] == 3
    widget.labels_layer.selected_label = 1  # selecting a label selects its row
    assert table.selected_id() == 1
    table.table.selectRow(1)
    table.delete_button.click()
    settle(widget)
    assert [r.obj_id for r in table.rows] == [1] and not (widget.labels_layer.data == 2).any()
    assert widget.annotator._state.obj_ids == [1]


def test_lineage_toggles_find_divisions_and_the_tracks_show_them(make_napari_viewer, movie, random_checkpoint,
                                                                  monkeypatch):
    from napari_sam2.lineage import LineageTracker

    made = []
    real_init = LineageTracker.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    def split_object_1_at_frame_2(self, t, frame, candidates):
        if t != 2 or self.parents:
            return None
        left, right = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
        left[20:36, 10:20], right[20:36, 40:50] = True, True
        return 1, 2, (left, right)

    monkeypatch.setattr(LineageTracker, "__init__", spy_init)
    monkeypatch.setattr(LineageTracker, "find_split", split_object_1_at_frame_2)
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    widget.divisions_check.setChecked(True)
    widget.new_cells_check.setChecked(True)
    widget.new_every_spin.setValue(3)
    assert widget.lineage_options().lost_after == 5  # segment_stack's default
    widget.lost_after_spin.setValue(0)
    assert widget.lineage_options().lost_after is None and widget.lost_after_spin.text() == "never"
    widget.lost_after_spin.setValue(4)
    widget.propagate(direction="forward")
    settle(widget)
    (tracker,) = made
    assert tracker.div is not None and tracker.new is not None and tracker.new.every == 3
    assert tracker.lost_after == 4
    assert tracker.parents == {2: 1, 3: 1} and widget.annotator.parents == {2: 1, 3: 1}
    frame = widget.labels_layer.data[2]
    assert (frame == 2).any() and (frame == 3).any() and not (frame == 1).any()  # the parent ends there
    rows = {r.obj_id: r for r in widget.objects.rows}
    assert rows[2].parent == 1 and rows[3].parent == 1
    widget.make_tracks()
    settle(widget)
    tracks = viewer.layers["SAM2 tracks"]
    assert tracks.graph == {2: [1], 3: [1]}
    # lineage only goes forward
    widget.direction_combo.setCurrentText("backward")
    widget.propagate()
    settle(widget)
    assert "forward" in widget.status.text()


def test_prompt_during_propagation_is_applied_after_the_frame_in_flight(make_napari_viewer, movie, random_checkpoint):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    widget.labels_layer.data[4, 40:55, 40:55] = 2  # painted ahead of the pass
    running = []

    def during(t):
        if t == 1 and not running:
            running.append(widget.annotator.queue.running)
            widget.labels_layer.selected_label = 2
            widget.viewer.dims.set_current_step(0, 4)
            widget.use_painted_mask()

    seen = _frames_shown(widget, during)
    task = widget.propagate(direction="forward")
    settle(widget)
    assert running == [task]
    # frame 4's mask appears while the propagation runs, after the frame in flight when it was given
    # (1, or 2 if the worker had started it); the pass goes on with it to frames 3 and 4
    assert seen in ([0, 1, 4, 2, 3, 4], [0, 1, 2, 4, 3, 4])
    assert sorted(widget.annotator._state.obj_ids) == [1, 2] and (widget.labels_layer.data[4] == 2).any()


def test_image_removed_during_propagation_stops_cleanly(make_napari_viewer, movie, random_checkpoint, errors):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    seen = _frames_shown(widget, during=lambda t: "movie" in viewer.layers and viewer.layers.remove("movie"))
    task = widget.propagate(direction="forward")
    settle(widget)
    assert task.cancelled and len(seen) <= 2
    assert "stopped: image layer 'movie' was removed" in widget.status.text()
    assert widget.annotator.view is None and widget.annotator._state is None and not errors


def test_image_data_replaced_stops_the_session(make_napari_viewer, movie, random_checkpoint, errors):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    viewer.layers["movie"].data = np.zeros((5, 64, 64), np.uint16)
    settle(widget)
    assert "was replaced" in widget.status.text() and widget.annotator._state is None and not errors


def test_viewer_closed_during_propagation_leaves_no_thread(make_napari_viewer, movie, random_checkpoint):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    closed = []

    def close(t):
        if not closed:
            closed.append(t)
            viewer.close()

    _frames_shown(widget, during=close)
    widget.propagate(direction="forward")
    worker = widget.annotator.queue._thread
    from heartbeat import wait_for

    wait_for(lambda: bool(closed), timeout=60)
    wait_for(lambda: not worker.is_alive(), timeout=60)
    assert widget.annotator._closed and not widget.annotator.queue.alive and widget.annotator._state is None


def test_an_idle_widget_holds_no_thread(make_napari_viewer, movie, random_checkpoint, monkeypatch):
    from napari_sam2.annotator import tasks

    monkeypatch.setattr(tasks, "IDLE_EXIT_S", 0.2)
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    _paint(widget, 0, obj=1)
    settle(widget)
    from heartbeat import wait_for

    wait_for(lambda: not widget.annotator.queue.alive, timeout=30)  # a viewer left open costs no thread
    _paint(widget, 2, obj=2)  # the next prompt starts one again
    settle(widget)
    assert sorted(widget.annotator._state.obj_ids) == [1, 2] and (widget.labels_layer.data[2] == 2).any()


def test_2d_image_is_segmented_alone(make_napari_viewer, movie, random_checkpoint, errors):
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint, image=movie.image[2])
    assert widget.annotator.view.n_frames == 1 and widget.labels_layer.data.shape == (64, 64)
    assert widget.points_layer.ndim == 2
    widget.labels_layer.data[10:30, 10:30] = 1
    widget.labels_layer.selected_label = 1
    widget.use_painted_mask()
    settle(widget)
    assert 380 <= (widget.labels_layer.data == 1).sum() <= 400
    widget.points_layer.add([[40, 40]])
    settle(widget)
    widget.propagate()
    settle(widget)
    assert not errors and widget.annotator._state.num_frames == 1


def test_rgb_time_lapse(make_napari_viewer, movie, random_checkpoint, errors):
    rgb = np.repeat((movie.image // 256).astype(np.uint8)[..., None], 3, axis=-1)
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint, image=rgb, rgb=True)
    assert widget.labels_layer.data.shape == (5, 64, 64) and widget.annotator.view.axes == "TYXC"
    _paint(widget, 2, obj=1)
    _click(widget, 2, 50, 50, obj=2)
    settle(widget)
    widget.propagate(direction="both")
    settle(widget)
    assert not errors and sorted(widget.annotator._state.obj_ids) == [1, 2]


def test_model_downloaded_in_the_worker_with_a_progress_bar(make_napari_viewer, movie, random_checkpoint, tmp_path,
                                                            monkeypatch, errors):
    """No checkpoint given and none cached: the official file comes over HTTP (a local server), in the
    worker, its bytes counted by the task's progress bar."""
    import dataclasses
    import hashlib
    import http.server

    from napari_sam2.checkpoints import REGISTRY

    payload = random_checkpoint.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NAPARI_SAM2_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
        monkeypatch.chdir(tmp_path)
        name = "sam2.1_hiera_tiny"
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], sha256=hashlib.sha256(payload).hexdigest()))
        viewer, widget = _widget(make_napari_viewer, movie, "")
        bars = []
        shown = widget.task_progress

        def spy(task):
            shown(task)
            bars.append([getattr(b, "desc", None) for b in widget._progress.values()])

        widget.task_progress = spy
        task = widget.load_model()
        settle(widget)
        assert not errors and widget.annotator._predictor is not None
        assert "loaded on cpu" in widget.status.text()
        assert (tmp_path / "cache" / f"{name}.pt").read_bytes() == payload
        assert task.done == task.total == len(payload)
        assert len(bars) > 3 and ["SAM2: load model"] in bars  # a bar in napari's activity area while it ran
        assert not widget._progress  # and none left when it is done
        assert widget.model_combo.currentText() == f"{name} (downloaded)"
    finally:
        httpd.shutdown()
        httpd.server_close()
