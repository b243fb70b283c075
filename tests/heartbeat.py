"""A napari session driven as a user would, with a heartbeat in the Qt event loop.

Shared by the responsiveness test (tests/test_napari_responsive.py) and its benchmark
(benchmarks/bench_napari.py): load the model, click on a frame, click on another frame, precompute
the stack, click again (now the decoder alone answers), propagate, export. A QTimer beats every
10 ms in the GUI thread; the longest gap between beats is the longest the viewer was frozen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

BEAT_MS = 10


@dataclass
class Heartbeat:
    """Beats of a 10 ms QTimer; the gaps between them, per step of the session."""

    beats: list[float] = field(default_factory=list)
    steps: list[tuple[str, int]] = field(default_factory=list)  # (name, index of the first beat)

    def start(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(BEAT_MS)
        self.timer.timeout.connect(lambda: self.beats.append(time.perf_counter()))
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.stop()

    def mark(self, step: str) -> None:
        self.steps.append((step, len(self.beats)))

    def worst(self, step: str | None = None) -> float:
        """The longest gap (s) between two beats, over the session or during ``step``."""
        beats = np.asarray(self.beats)
        if step is not None:
            bounds = [i for i, (name, _) in enumerate(self.steps) if name == step]
            if not bounds:
                return 0.0
            i = bounds[0]
            lo = max(self.steps[i][1] - 1, 0)
            hi = self.steps[i + 1][1] if i + 1 < len(self.steps) else len(beats)
            beats = beats[lo:hi]
        return float(np.diff(beats).max()) if len(beats) > 1 else 0.0


def wait_idle(widget, timeout: float = 600.0) -> None:
    """Run the event loop until the widget's worker has nothing to do and its messages are shown."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.002)
        calm = calm + 1 if widget.annotator.queue.idle else 0
        if calm >= 20:  # idle for ~40 ms of events: what the worker posted has been shown
            return
    raise TimeoutError(f"the worker was still busy after {timeout} s: {widget.work_label.text()}")


def wait_for(predicate, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        app.processEvents()
        time.sleep(0.002)


def click_to_mask(widget, t: int, y: float, x: float, obj: int = 1) -> float:
    """Seconds from a click on frame t to its mask shown in the masklets layer."""
    shown = []
    show = widget.show_frame

    def spy(frame_t, labels):
        show(frame_t, labels)
        if frame_t == t:
            shown.append(time.perf_counter())

    widget.show_frame = spy
    try:
        widget.labels_layer.selected_label = obj
        t0 = time.perf_counter()
        widget.points_layer.add([[t, y, x]])
        wait_for(lambda: bool(shown))
        wait_idle(widget)
    finally:
        del widget.show_frame
    return shown[0] - t0


def run_session(viewer, widget, out_dir, n_frames: int, direction: str = "both") -> dict:
    """The session of the heartbeat test; returns its figures (seconds).

    The prompt layers are made first, outside the heartbeat: creating napari layers is napari's own
    work in the GUI thread (its first Labels layer compiles colormap kernels); it is reported apart.
    """
    t0 = time.perf_counter()
    assert widget.ensure_layers()
    wait_for(lambda: True)
    figures = {"layers_s": time.perf_counter() - t0}
    beat = Heartbeat().start()

    def timed(step: str, act) -> float:
        beat.mark(step)
        t0 = time.perf_counter()
        act()
        wait_idle(widget)
        return time.perf_counter() - t0

    try:
        figures["load_s"] = timed("load", widget.load_model)
        beat.mark("first click")
        figures["first_click_s"] = click_to_mask(widget, 0, 20, 20)
        beat.mark("click on another frame")
        figures["other_frame_click_s"] = click_to_mask(widget, n_frames - 1, 40, 40)
        figures["precompute_s"] = timed("precompute", widget.precompute)
        beat.mark("click after precompute")
        encoded = widget.annotator._state.features.encoded
        figures["click_after_precompute_s"] = click_to_mask(widget, 1, 30, 30, obj=2)
        figures["encoded_for_last_click"] = widget.annotator._state.features.encoded - encoded
        figures["propagate_s"] = timed("propagate", lambda: widget.propagate(direction=direction))
        timed("export", lambda: widget.export(out_dir / "masklets.ome.zarr", "zarr"))
        beat.mark("end")
    finally:
        beat.stop()
    figures["worst_stall_s"] = beat.worst()
    figures["stalls"] = {name: beat.worst(name) for name, _ in beat.steps if name != "end"}
    return figures


def stack(n_frames: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """A 16-bit time-lapse of bright blobs (what the issue measured on: 256 x 256 uint16)."""
    from napari_sam2.synthetic import make_timelapse

    movie = make_timelapse(n_frames=n_frames, shape=(size, size), n_cells=3, divide=False, enter=False, seed=seed)
    return movie.image
