"""napari dock widget: SAM2 video segmentation of a time-lapse (or a 3D stack) from clicks and boxes.

Workflow: choose the image layer (and, for 4D data, the axis to propagate along), the model, the
device and the image size; click objects in the "SAM2 points" layer (key ``t`` toggles positive /
negative clicks) or draw rectangles in the "SAM2 boxes" layer. The object id is the label selected in
the "SAM2 masklets" Labels layer. Each prompt shows its frame's mask at once; "Propagate" tracks all
objects through the stack in a worker thread, writing each frame into "SAM2 masklets" as it comes.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .modeling.configs import DEFAULT_MODEL
from .propagation import DIRECTIONS, plan_passes, run_passes

POINTS_NAME = "SAM2 points"
BOXES_NAME = "SAM2 boxes"
LABELS_NAME = "SAM2 masklets"
TRACKS_NAME = "SAM2 tracks"
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


class _Session:
    """Which image is segmented and how its (T, Y, X) video maps into the layers' coordinates."""

    def __init__(self, layer, axis: int, fixed: dict[int, int]):
        self.layer = layer
        self.axis = axis  # the propagated axis of the layer's data
        self.fixed = dict(fixed)  # other leading axes -> the index in view
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        self.rgb = bool(getattr(layer, "rgb", False))
        self.shape = tuple(int(s) for s in data.shape)
        spatial = 3 if self.rgb else 2
        self.lead = len(self.shape) - spatial
        index = []
        for d in range(self.lead):
            index.append(slice(None) if d == axis else self.fixed.get(d, 0))
        video = data[tuple(index)]
        self.video = video
        self.n_frames = self.shape[axis]
        self.height, self.width = self.shape[self.lead], self.shape[self.lead + 1]
        self.labels_shape = self.shape[: self.lead + 2]
        self.state = None
        self.predictor_key = None

    def frame_index(self, t: int) -> tuple:
        """Index of frame t in the labels layer's data."""
        return tuple(int(t) if d == self.axis else self.fixed.get(d, 0) for d in range(self.lead))

    def frame_of(self, coord) -> int | None:
        """The frame of a layer coordinate (None when it lies on another slice of a fixed axis)."""
        for d, i in self.fixed.items():
            if int(round(float(coord[d]))) != i:
                return None
        t = int(round(float(coord[self.axis])))
        return t if 0 <= t < self.n_frames else None

    def labels_video(self, labels_data):
        """The (T, Y, X) view of the labels layer's data for this session."""
        index = tuple(slice(None) if d == self.axis else self.fixed.get(d, 0) for d in range(self.lead))
        return labels_data[index]


class SAM2Widget(QWidget):
    """Dock widget driving :class:`napari_sam2.predictor.video.VideoPredictor` from napari layers."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._predictor = None
        self._predictor_key = None
        self._session: _Session | None = None
        self._applied: dict[tuple[int, int], Any] = {}  # (t, obj) -> prompt signature sent to the predictor
        self._worker = None
        self._pending = False
        self._updating = False
        self.positive = True
        self._connected = weakref.WeakSet()
        self._done = 0
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)

        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._image_changed)
        form.addRow("Image", self.image_combo)
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip("The axis to propagate along (time for a time-lapse, Z for a 3D stack); "
                                   "other leading axes are taken at the slice in view.")
        form.addRow("Propagate along", self.axis_combo)

        from .checkpoints import REGISTRY

        self.model_combo = QComboBox()
        for name in REGISTRY:
            self.model_combo.addItem(name, name)
        self._mark_cached()
        index = self.model_combo.findData(DEFAULT_MODEL)
        self.model_combo.setCurrentIndex(max(index, 0))
        form.addRow("Model", self.model_combo)

        row = QHBoxLayout()
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("official weights (downloaded if missing)")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_checkpoint)
        row.addWidget(self.checkpoint_edit)
        row.addWidget(browse)
        form.addRow("Checkpoint", row)

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.size_spin = QSpinBox()
        self.size_spin.setRange(128, 2048)
        self.size_spin.setSingleStep(64)
        self.size_spin.setValue(1024)
        self.size_spin.setToolTip("Network input size: 1024 as trained; smaller is faster on small images.")
        form.addRow("Image size", self.size_spin)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(PRECISIONS)
        self.precision_combo.setToolTip("auto: bf16 on GPUs and CPUs that compute it natively (AMX, AVX-512 BF16), "
                                        "else fp32. fp32 gives the reference's numbers exactly.")
        form.addRow("Precision", self.precision_combo)

        self.prompt_button = QPushButton("Add prompt layers")
        self.prompt_button.setToolTip("Points: click objects ('t' toggles positive/negative). Boxes: draw rectangles. "
                                      "The object id is the label selected in 'SAM2 masklets'.")
        self.prompt_button.clicked.connect(self.ensure_layers)
        layout.addWidget(self.prompt_button)
        self.mode_label = QLabel()
        layout.addWidget(self.mode_label)
        self._show_mode()

        prop = QFormLayout()
        layout.addLayout(prop)
        self.direction_combo = QComboBox()
        self.direction_combo.addItems(DIRECTIONS)
        prop.addRow("Direction", self.direction_combo)
        rng = QHBoxLayout()
        self.start_spin = QSpinBox()
        self.end_spin = QSpinBox()
        rng.addWidget(self.start_spin)
        rng.addWidget(QLabel("to"))
        rng.addWidget(self.end_spin)
        prop.addRow("Frames", rng)

        buttons = QHBoxLayout()
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.clicked.connect(self.propagate)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.propagate_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m frames")
        layout.addWidget(self.progress)

        more = QHBoxLayout()
        self.clear_button = QPushButton("Clear object")
        self.clear_button.clicked.connect(self.clear_object)
        self.reset_button = QPushButton("Reset")
        self.reset_button.clicked.connect(self.reset)
        more.addWidget(self.clear_button)
        more.addWidget(self.reset_button)
        layout.addLayout(more)
        more2 = QHBoxLayout()
        self.tracks_button = QPushButton("Tracks layer")
        self.tracks_button.clicked.connect(self.make_tracks)
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(self._export_dialog)
        more2.addWidget(self.tracks_button)
        more2.addWidget(self.export_button)
        layout.addLayout(more2)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _mark_cached(self) -> None:
        from .checkpoints import is_cached

        for i in range(self.model_combo.count()):
            name = self.model_combo.itemData(i)
            try:
                cached = is_cached(name)
            except Exception:
                cached = False
            self.model_combo.setItemText(i, f"{name} (downloaded)" if cached else name)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM2 checkpoint", "", "PyTorch checkpoint (*.pt *.pth);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _refresh_layers(self, event=None) -> None:
        current = self.image_combo.currentText()
        names = [lyr.name for lyr in self._image_layers()]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentIndex(names.index(current))
        self.image_combo.blockSignals(False)
        self._image_changed()

    def _image_changed(self, *args) -> None:
        layer = self.image_layer
        self.axis_combo.clear()
        if layer is None:
            return
        data = layer.data[0] if layer.multiscale else layer.data
        lead = data.ndim - (3 if layer.rgb else 2)
        for d in range(lead):
            self.axis_combo.addItem(f"axis {d} ({data.shape[d]})", d)
        n = data.shape[0] if lead else 1
        for spin in (self.start_spin, self.end_spin):
            spin.setRange(0, max(n - 1, 0))
        self.start_spin.setValue(0)
        self.end_spin.setValue(max(n - 1, 0))

    @property
    def image_layer(self):
        name = self.image_combo.currentText()
        for lyr in self._image_layers():
            if lyr.name == name:
                return lyr
        return None

    def _layer(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    @property
    def points_layer(self):
        return self._layer(POINTS_NAME)

    @property
    def boxes_layer(self):
        return self._layer(BOXES_NAME)

    @property
    def labels_layer(self):
        return self._layer(LABELS_NAME)

    @property
    def obj_id(self) -> int:
        labels = self.labels_layer
        return max(int(labels.selected_label), 1) if labels is not None else 1

    def _show_mode(self) -> None:
        kind = "positive (object)" if self.positive else "negative (background)"
        self.mode_label.setText(f"Object {self.obj_id}: new clicks are {kind}; 't' toggles")

    # ------------------------------------------------------------------ session
    def _current_session(self, create: bool = True) -> _Session | None:
        layer = self.image_layer
        if layer is None:
            if create:
                _notify_error("no image layer: open a time-lapse (or a 3D stack) first, then choose it as 'Image'.")
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        lead = data.ndim - (3 if layer.rgb else 2)
        if lead < 1:
            if create:
                _notify_error(f"image '{layer.name}' is a single 2D frame: SAM2 video segmentation needs a "
                              "(T, Y, X) time-lapse or a 3D stack.")
            return None
        axis = self.axis_combo.currentData()
        axis = 0 if axis is None else int(axis)
        step = self.viewer.dims.current_step
        offset = self.viewer.dims.ndim - data.ndim
        fixed = {d: int(step[d + offset]) for d in range(lead) if d != axis}
        s = self._session
        if s is not None and s.layer is layer and s.axis == axis and s.fixed == fixed:
            return s
        if not create:
            return None
        self._session = _Session(layer, axis, fixed)
        self._applied = {}
        return self._session

    def ensure_layers(self) -> bool:
        """Create the prompt layers and the masklets layer if missing (True when ready)."""
        session = self._current_session()
        if session is None:
            return False
        layer = session.layer
        geometry = {"scale": layer.scale[: len(session.labels_shape)], "translate": layer.translate[: len(session.labels_shape)]}
        ndim = len(session.labels_shape)
        labels = self.labels_layer
        if labels is None or tuple(labels.data.shape) != session.labels_shape:
            if labels is not None:
                self.viewer.layers.remove(labels)
            labels = self.viewer.add_labels(np.zeros(session.labels_shape, dtype=np.uint32), name=LABELS_NAME, opacity=0.5, **geometry)
            labels.selected_label = 1
        for old in (self.points_layer, self.boxes_layer):
            if old is not None and old.ndim != ndim:  # made for another image
                self.viewer.layers.remove(old)
        if self.points_layer is None:
            pts = self.viewer.add_points(
                np.zeros((0, ndim)), name=POINTS_NAME, ndim=ndim, size=max(4, min(session.height, session.width) / 25),
                features={"obj_id": np.zeros(0, dtype=int), "positive": np.zeros(0, dtype=bool)},
                face_color=POSITIVE_COLOR, border_color="white", **geometry,
            )
            pts.mode = "add"
        if self.boxes_layer is None:
            self.viewer.add_shapes(
                None, ndim=ndim, name=BOXES_NAME, shape_type="rectangle", edge_color="yellow", face_color="transparent",
                edge_width=max(1, min(session.height, session.width) / 200), features={"obj_id": np.zeros(0, dtype=int)},
                **geometry,
            )
        self._connect(labels, self.points_layer, self.boxes_layer)
        self._label_changed()
        self.viewer.layers.selection.active = self.points_layer
        return True

    def _connect(self, labels, points, boxes) -> None:
        """Listen to the layers (once per layer, also for layers made before this widget)."""
        done = self._connected
        if labels not in done:
            labels.events.selected_label.connect(self._label_changed)
            done.add(labels)
        if points not in done:
            points.events.data.connect(self._prompts_changed)
            points.bind_key("t", lambda _layer: self.toggle_positive(), overwrite=True)
            done.add(points)
        if boxes not in done:
            boxes.events.data.connect(self._prompts_changed)
            done.add(boxes)

    def _label_changed(self, event=None) -> None:
        obj = self.obj_id
        if self.points_layer is not None:
            self.points_layer.feature_defaults = {"obj_id": obj, "positive": self.positive}
        if self.boxes_layer is not None:
            self.boxes_layer.feature_defaults = {"obj_id": obj}
        self._show_mode()

    def toggle_positive(self) -> None:
        """Switch new clicks between positive and negative (key 't' in the points layer)."""
        self.positive = not self.positive
        pts = self.points_layer
        if pts is not None:
            pts.feature_defaults = {"obj_id": self.obj_id, "positive": self.positive}
            pts.current_face_color = POSITIVE_COLOR if self.positive else NEGATIVE_COLOR
        self._show_mode()

    def predictor(self):
        """The video predictor for the chosen model, device and size (built once, then reused)."""
        name = self.model_combo.currentData()
        ckpt = self.checkpoint_edit.text().strip() or None
        key = (name, ckpt, self.device_combo.currentText(), int(self.size_spin.value()),
               self.precision_combo.currentText())
        if self._predictor is not None and key == self._predictor_key:
            return self._predictor
        from .build import build_model, resolve_device
        from .predictor.video import VideoPredictor

        self.status.setText(f"loading {name} ...")
        try:
            device = resolve_device(key[2])
        except Exception as exc:
            _notify_error(f"device '{key[2]}' cannot be used: {exc}")
            self.status.setText("model not loaded")
            return None
        try:
            model = build_model(name, checkpoint=ckpt, device=device, image_size=key[3], precision=key[4])
        except Exception as exc:  # bad file, wrong model, no network, no CUDA...
            reason = str(exc).strip() or type(exc).__name__
            what = f"'{ckpt}'" if ckpt else f"the {name} weights"
            _notify_error(f"could not load {what}: {reason}; choose the checkpoint of {name} or another model")
            self.status.setText("model not loaded")
            return None
        self._predictor = VideoPredictor(model, add_all_frames_to_correct_as_cond=True)
        self._predictor_key = key
        self.status.setText(f"{name} loaded on {model.device} in {model.precision}")
        self._mark_cached()
        return self._predictor

    def _state(self):
        """(predictor, session) with the session's state opened on the current predictor."""
        session = self._current_session()
        if session is None:
            return None, None
        predictor = self.predictor()
        if predictor is None:
            return None, None
        if session.state is None or session.predictor_key != self._predictor_key:
            try:
                axes = "TYXC" if session.rgb else "TYX"
                session.state = predictor.init_state(session.video, axes=axes)
            except Exception as exc:
                _notify_error(f"could not read image '{session.layer.name}': {exc}")
                return None, None
            session.predictor_key = self._predictor_key
            self._applied = {}
        return predictor, session

    # ------------------------------------------------------------------ prompts
    def _collect_prompts(self, session: _Session) -> dict[tuple[int, int], dict]:
        """(t, obj) -> {"points": [(y, x)...], "positive": [...], "box": (y0, x0, y1, x1) or None}."""
        prompts: dict[tuple[int, int], dict] = {}
        ya, xa = session.lead, session.lead + 1
        pts = self.points_layer
        if pts is not None and len(pts.data):
            ids = pts.features["obj_id"].to_numpy() if "obj_id" in pts.features else np.ones(len(pts.data), int)
            pos = pts.features["positive"].to_numpy() if "positive" in pts.features else np.ones(len(pts.data), bool)
            for coord, obj, p in zip(pts.data, ids, pos):
                t = session.frame_of(coord)
                if t is None:
                    continue
                entry = prompts.setdefault((t, int(obj)), {"points": [], "positive": [], "box": None})
                entry["points"].append((float(coord[ya]), float(coord[xa])))
                entry["positive"].append(bool(p))
        shp = self.boxes_layer
        if shp is not None and len(shp.data):
            ids = shp.features["obj_id"].to_numpy() if "obj_id" in shp.features else np.ones(len(shp.data), int)
            for corners, obj in zip(shp.data, ids):
                corners = np.asarray(corners)
                t = session.frame_of(corners[0])
                if t is None:
                    continue
                entry = prompts.setdefault((t, int(obj)), {"points": [], "positive": [], "box": None})
                entry["box"] = (corners[:, ya].min(), corners[:, xa].min(), corners[:, ya].max(), corners[:, xa].max())
        return prompts

    @staticmethod
    def _signature(entry: dict) -> tuple:
        box = None if entry["box"] is None else tuple(round(float(v), 3) for v in entry["box"])
        return tuple((round(y, 3), round(x, 3), p) for (y, x), p in zip(entry["points"], entry["positive"])), box

    def _prompts_changed(self, event=None) -> None:
        action = getattr(event, "action", None)
        if action is not None and str(getattr(action, "value", action)) in ("adding", "removing", "changing"):
            return
        pts = self.points_layer
        if pts is not None and len(pts.data):
            pos = pts.features["positive"].to_numpy() if "positive" in pts.features else np.ones(len(pts.data), bool)
            colors = [POSITIVE_COLOR if p else NEGATIVE_COLOR for p in pos]
            if not self._updating:
                self._updating = True
                try:
                    pts.face_color = colors
                finally:
                    self._updating = False
        if self._worker is not None:
            self._pending = True  # applied when the propagation ends
            return
        self.apply_prompts()

    def apply_prompts(self) -> None:
        """Send new or changed prompts to the predictor and show their frames' masks at once."""
        session = self._current_session(create=False) or self._current_session()
        if session is None:
            return
        prompts = self._collect_prompts(session)
        changed = {k for k, v in prompts.items() if self._applied.get(k) != self._signature(v)}
        removed = set(self._applied) - set(prompts)
        if not changed and not removed:
            return
        predictor, session = self._state()
        if predictor is None:
            return
        # a new model or image session starts empty: every prompt is new to it
        changed = {k for k, v in prompts.items() if self._applied.get(k) != self._signature(v)}
        removed = set(self._applied) - set(prompts)
        state = session.state
        frames: dict[int, Any] = {}
        for t, obj in sorted(removed):
            self._applied.pop((t, obj), None)
            if obj in state.obj_ids:
                still = any(o == obj for (_, o) in prompts)
                try:
                    if still:
                        out = predictor.clear_all_prompts_in_frame(state, t, obj)
                        frames[t] = out
                    else:
                        predictor.remove_object(state, obj)
                        self._erase_label(session, obj, t)
                except Exception as exc:
                    _notify_error(f"could not remove the prompts of object {obj} on frame {t}: {exc}")
        from .prompts import Prompt, clip_box, clip_points

        for t, obj in sorted(changed):
            entry = prompts[(t, obj)]
            p = Prompt(t=t, obj_id=obj, points=np.asarray(entry["points"], dtype=float).reshape(-1, 2),
                       positive=np.asarray(entry["positive"], dtype=bool), box=entry["box"])
            pts_xy = p.xy_points()
            labels = None
            if pts_xy is not None:
                pts_xy = clip_points(pts_xy, session.height, session.width)
                labels = p.positive.astype(np.int32)
            box = p.xyxy_box()
            if box is not None:
                box = clip_box(box, session.height, session.width)
            try:
                frames[t] = predictor.add_new_points_or_box(state, frame_idx=t, obj_id=obj, points=pts_xy, labels=labels, box=box)
            except Exception as exc:
                _notify_error(f"prompt for object {obj} on frame {t} not used: {exc}")
                continue
            self._applied[(t, obj)] = self._signature(entry)
        for t, out in frames.items():
            if out is not None:
                _, ids, logits = out
                self._write_frame(t, self._to_labels(logits, ids))

    @staticmethod
    def _to_labels(logits, obj_ids) -> np.ndarray:
        from .labels import logits_to_labels

        return logits_to_labels(logits, obj_ids)

    def _write_frame(self, t: int, frame: np.ndarray) -> None:
        session, labels = self._session, self.labels_layer
        if session is None or labels is None:
            return
        labels.data[session.frame_index(t)] = frame
        labels.refresh()

    def _erase_label(self, session: _Session, obj: int, t: int | None = None) -> None:
        labels = self.labels_layer
        if labels is None:
            return
        video = session.labels_video(labels.data)
        video[video == obj] = 0
        labels.refresh()

    # ------------------------------------------------------------------ propagation
    def propagate(self, direction: str | None = None, start: int | None = None, end: int | None = None):
        """Track every object through frames ``start..end`` in a worker thread; returns the worker."""
        if self._worker is not None:
            _notify_info("a propagation is running: wait for it or press Cancel")
            return None
        if not self.ensure_layers():
            return None
        self.apply_prompts()
        predictor, session = self._state()
        if predictor is None:
            return None
        if not session.state.obj_ids:
            _notify_error("no prompt yet: click an object in 'SAM2 points' (or draw a box in 'SAM2 boxes') first.")
            return None
        direction = direction or self.direction_combo.currentText()
        lo = self.start_spin.value() if start is None else int(start)
        hi = self.end_spin.value() if end is None else int(end)
        lo, hi = max(0, min(lo, hi)), min(session.n_frames - 1, max(lo, hi))
        from napari.qt.threading import thread_worker

        passes = plan_passes(direction, [t for (t, _) in self._applied], lo, hi)
        total = sum(p.frames for p in passes)

        state = session.state
        to_labels = self._to_labels

        @thread_worker(start_thread=False)
        def run():
            for t, ids, logits in run_passes(predictor, state, passes):
                yield int(t), to_labels(logits, ids)

        worker = run()
        self._worker = worker
        self._done = 0
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(0)
        worker.yielded.connect(self._on_frame)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.propagate_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"propagating {direction} over frames {lo}..{hi}")
        worker.start()
        return worker

    def _on_frame(self, item) -> None:
        t, frame = item
        self._write_frame(t, frame)
        self._done += 1
        self.progress.setValue(min(self._done, self.progress.maximum()))

    def _on_error(self, exc) -> None:
        _notify_error(f"propagation stopped: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self.propagate_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.status.setText(f"{self._done} frames written")
        if self._pending:
            self._pending = False
            self.apply_prompts()

    def cancel(self) -> None:
        """Stop the propagation after the frame being computed."""
        if self._worker is not None:
            self._worker.quit()
            self.status.setText("cancelling ...")

    # ------------------------------------------------------------------ editing
    def clear_object(self, obj_id: int | None = None) -> None:
        """Remove one object (default: the selected label): its prompts, its session and its masks."""
        obj = self.obj_id if obj_id is None else int(obj_id)
        if self._worker is not None:
            _notify_info("cancel the propagation first")
            return
        session = self._session
        for layer in (self.points_layer, self.boxes_layer):
            if layer is not None and len(layer.data) and "obj_id" in layer.features:
                keep = layer.features["obj_id"].to_numpy() != obj
                if not keep.all():
                    layer.selected_data = set(np.flatnonzero(~keep).tolist())
                    layer.remove_selected()
        if session is not None and session.state is not None and obj in session.state.obj_ids:
            self._predictor.remove_object(session.state, obj)
        self._applied = {k: v for k, v in self._applied.items() if k[1] != obj}
        if session is not None:
            self._erase_label(session, obj)

    def reset(self) -> None:
        """Remove every prompt, object and mask."""
        if self._worker is not None:
            _notify_info("cancel the propagation first")
            return
        session = self._session
        self._applied = {}
        for layer in (self.points_layer, self.boxes_layer):
            if layer is not None and len(layer.data):
                layer.selected_data = set(range(len(layer.data)))
                layer.remove_selected()
        self._applied = {}
        if session is not None and session.state is not None and self._predictor is not None:
            self._predictor.reset_state(session.state)
        labels = self.labels_layer
        if labels is not None:
            labels.data[...] = 0
            labels.refresh()

    # ------------------------------------------------------------------ outputs
    def _labels_video(self):
        labels, session = self.labels_layer, self._session
        if labels is None or session is None:
            return None
        return session.labels_video(labels.data)

    def make_tracks(self):
        """A Tracks layer (track id = object id) from the masklets' centroids."""
        from .tracking import napari_tracks, tracks_table

        video = self._labels_video()
        if video is None:
            _notify_error("no masklets yet: add prompts and propagate first.")
            return None
        data = napari_tracks(tracks_table(video))
        if len(data) == 0:
            _notify_error("the masklets are empty: nothing to track.")
            return None
        if TRACKS_NAME in self.viewer.layers:
            self.viewer.layers.remove(TRACKS_NAME)
        scale = self.labels_layer.scale
        session = self._session
        tscale = [scale[session.axis], scale[session.lead], scale[session.lead + 1]]
        return self.viewer.add_tracks(data, name=TRACKS_NAME, scale=tscale, tail_length=10)

    def export(self, path, fmt: str | None = None) -> Path | None:
        """Write the masklets as OME-Zarr (``.zarr``), TIFF (``.tif``) or a CTC folder (anything else / ``fmt='ctc'``)."""
        video = self._labels_video()
        if video is None:
            _notify_error("no masklets to export: add prompts and propagate first.")
            return None
        path = Path(path)
        from .label_formats import write_labels

        try:
            write_labels(path, video, fmt, overwrite=True)
        except Exception as exc:
            _notify_error(f"could not export to '{path}': {exc}")
            return None
        self.status.setText(f"exported {path}")
        return path

    def _export_dialog(self) -> None:
        filters = "OME-Zarr (*.ome.zarr);;TIFF (*.tif);;Cell Tracking Challenge folder (*_RES)"
        path, chosen = QFileDialog.getSaveFileName(self, "Export masklets", "masklets.ome.zarr", filters)
        if not path:
            return
        fmt = "ome-zarr" if chosen.startswith("OME") else "tiff" if chosen.startswith("TIFF") else "ctc"
        self.export(path, fmt)
