"""napari dock widget: SAM2 video segmentation of a time-lapse (or a 3D stack, or one image).

A thin Qt shell over :class:`napari_sam2.annotator.Annotator`: it reads the layers, shows what the
annotator sends back, and never runs heavy work itself. Click objects in "SAM2 points" (key ``t``
toggles positive / negative), draw rectangles in "SAM2 boxes", or paint a label in "SAM2 masklets"
and use it as a mask prompt; the object is the label selected in "SAM2 masklets". Each prompt shows
its frame's mask as soon as the worker has it; "Propagate" tracks all objects through the stack.
"Fine-tune" trains the model on the corrected masklets and goes on with the new checkpoint.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox
from qtpy.QtCore import QObject, Qt, Signal, Slot
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._object_table import ObjectTable
from .annotator import Annotator, AnnotatorError, LineageOptions, ModelChoice, ObjectInfo, StackView, Task
from .annotator.layer_prompts import feature_column
from .annotator.stack_view import layer_array
from .lineage import LOST_AFTER
from .modeling.configs import DEFAULT_MODEL
from .propagation import DIRECTIONS

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


def _warm_up_layers(task) -> None:
    """Import napari's layer modules and compile its labels colormap kernels off the GUI thread: the first
    Labels layer of a session otherwise spends ~2 s on them in the GUI thread (measured on 2 cores)."""
    import napari._vispy.layers.labels  # noqa: F401
    import napari._vispy.layers.points  # noqa: F401
    import napari._vispy.layers.shapes  # noqa: F401
    from napari.layers import Labels

    Labels(np.zeros((2, 8, 8), dtype=np.uint32))


class _GuiThread(QObject):
    """Runs callables posted from the worker thread in the GUI thread (a queued signal)."""

    call = Signal(object)

    def __init__(self):
        super().__init__()
        self.call.connect(self._run)  # a slot of this object: queued into the thread it lives in

    @Slot(object)
    def _run(self, fn) -> None:
        try:
            fn()
        except RuntimeError as exc:
            if "deleted" not in str(exc):  # a widget of a closed viewer: nothing to show it in
                _notify_error(f"SAM2 widget: {exc}")
        except Exception as exc:  # noqa: BLE001 - an uncaught exception in a slot would abort napari
            _notify_error(f"SAM2 widget: {type(exc).__name__}: {exc}")

    def post(self, fn) -> None:
        try:
            self.call.emit(fn)
        except RuntimeError:  # the widget is gone (viewer closed): nobody to tell
            pass


class SAM2Widget(QWidget):
    """Dock widget driving the SAM2 video predictor from napari layers, through a background worker."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.positive = True
        self._connected = weakref.WeakSet()
        self._updating = False
        self._progress: dict[int, object] = {}  # task number -> napari progress bar (activity area)
        self.train_options: dict = {}  # more finetune() options for "Fine-tune" (scripts, tests: augment, val_every...)
        self._gui = _GuiThread()
        self.annotator = Annotator(self._gui.post, self)
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self._refresh_layers()
        annotator = self.annotator
        self.destroyed.connect(lambda *_: annotator.close(timeout=0))
        annotator.queue.submit(Task("prepare napari layers", _warm_up_layers))

    # ================================================================== UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)

        self.image_choice = ComboBox(choices=self._image_choices, nullable=True)
        self.image_choice.changed.connect(self._image_changed)
        form.addRow("Image", self.image_choice.native)
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip("The axis to propagate along (time for a time-lapse, Z for a 3D stack); "
                                   "other leading axes are taken at the slice in view.")
        form.addRow("Propagate along", self.axis_combo)

        from .checkpoints import REGISTRY

        self.model_combo = QComboBox()
        for name in REGISTRY:
            self.model_combo.addItem(name, name)
        self._mark_cached()
        self.model_combo.setCurrentIndex(max(self.model_combo.findData(DEFAULT_MODEL), 0))
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
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Build the model (and download its weights) now; the first prompt does it too.")
        self.load_button.clicked.connect(self.load_model)
        layout.addWidget(self.load_button)

        prompts = QHBoxLayout()
        self.prompt_button = QPushButton("Add prompt layers")
        self.prompt_button.setToolTip("Points: click objects ('t' toggles positive/negative). Boxes: draw rectangles. "
                                      "The object id is the label selected in 'SAM2 masklets'.")
        self.prompt_button.clicked.connect(self.ensure_layers)
        self.mask_button = QPushButton("Use painted mask")
        self.mask_button.setToolTip("The selected label as painted on this frame becomes that object's mask prompt.")
        self.mask_button.clicked.connect(self.use_painted_mask)
        prompts.addWidget(self.prompt_button)
        prompts.addWidget(self.mask_button)
        layout.addLayout(prompts)
        self.mode_label = QLabel()
        layout.addWidget(self.mode_label)
        seg = QHBoxLayout()
        self.segment_all_button = QPushButton("Segment all cells on this frame")
        self.segment_all_button.clicked.connect(self.segment_all)
        self.points_spin = QSpinBox()
        self.points_spin.setRange(2, 128)
        self.points_spin.setValue(32)
        self.points_spin.setToolTip("Points per side of the automatic mask generator's grid")
        seg.addWidget(self.segment_all_button)
        seg.addWidget(self.points_spin)
        layout.addLayout(seg)

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
        lineage = QHBoxLayout()
        self.new_cells_check = QCheckBox("new cells every")
        self.new_every_spin = QSpinBox()
        self.new_every_spin.setRange(1, 1000)
        self.new_every_spin.setValue(5)
        self.divisions_check = QCheckBox("divisions")
        for w in (self.new_cells_check, self.new_every_spin, QLabel("frames"), self.divisions_check):
            lineage.addWidget(w)
        prop.addRow("Find", lineage)
        self.lost_after_spin = QSpinBox()
        self.lost_after_spin.setRange(0, 1000)
        self.lost_after_spin.setValue(LOST_AFTER)
        self.lost_after_spin.setSpecialValueText("never")
        self.lost_after_spin.setSuffix(" frames")
        self.lost_after_spin.setToolTip("While finding new cells or divisions: a cell without a pixel on this many "
                                        "frames in a row has left the field and its track ends (never: it is "
                                        "tracked to the end).")
        prop.addRow("Cells leave after", self.lost_after_spin)

        buttons = QHBoxLayout()
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.precompute_button = QPushButton("Precompute")
        self.precompute_button.setToolTip("Encode the frames of the range into the feature cache: afterwards a click "
                                          "on any of them runs the decoder alone.")
        self.precompute_button.clicked.connect(lambda: self.precompute())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        for b in (self.propagate_button, self.precompute_button, self.cancel_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        layout.addWidget(self.progress)
        self.work_label = QLabel("")
        self.work_label.setWordWrap(True)
        layout.addWidget(self.work_label)

        self.objects = ObjectTable(self._select_object, self.clear_object, self._jump_to, self._color_of)
        layout.addWidget(self.objects)
        more = QHBoxLayout()
        self.clear_button = QPushButton("Clear object")
        self.clear_button.clicked.connect(lambda: self.clear_object())
        self.reset_button = QPushButton("Reset")
        self.reset_button.clicked.connect(self.reset)
        self.tracks_button = QPushButton("Tracks layer")
        self.tracks_button.clicked.connect(self.make_tracks)
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(self._export_dialog)
        for b in (self.clear_button, self.reset_button, self.tracks_button, self.export_button):
            more.addWidget(b)
        layout.addLayout(more)
        self._build_finetune(layout)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._show_mode()

    def _build_finetune(self, layout) -> None:
        """The data-engine loop's last step, folded away until asked for: it is used now and then."""
        self.finetune_toggle = QToolButton()
        self.finetune_toggle.setText("Fine-tune")
        self.finetune_toggle.setCheckable(True)
        self.finetune_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.finetune_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.finetune_toggle.setStyleSheet("QToolButton { border: none; }")
        self.finetune_toggle.setToolTip("Train the model on corrected masklets; then it segments your cells better.")
        layout.addWidget(self.finetune_toggle)
        self.finetune_box = QWidget()
        form = QFormLayout(self.finetune_box)
        form.setContentsMargins(12, 0, 0, 0)
        self.train_labels_choice = ComboBox(choices=self._labels_choices, nullable=True)
        self.train_labels_choice.native.setToolTip("The corrected labels of the image (T x Y x X, 0 = background); "
                                                   "every frame is taken as complete.")
        form.addRow("Labels", self.train_labels_choice.native)
        self.train_steps_spin = QSpinBox()
        self.train_steps_spin.setRange(1, 1_000_000)
        self.train_steps_spin.setValue(50)
        self.train_steps_spin.setToolTip("Optimiser steps, one clip each")
        self.train_frames_spin = QSpinBox()
        self.train_frames_spin.setRange(1, 64)
        self.train_frames_spin.setValue(8)
        self.train_frames_spin.setToolTip("Frames per training clip (8 as SAM2 trains; fewer is faster and lighter)")
        sizes = QHBoxLayout()
        sizes.addWidget(self.train_steps_spin)
        sizes.addWidget(QLabel("frames per clip"))
        sizes.addWidget(self.train_frames_spin)
        form.addRow("Steps", sizes)
        self.train_lora_spin = QSpinBox()
        self.train_lora_spin.setRange(0, 256)
        self.train_lora_spin.setValue(0)
        self.train_lora_spin.setSpecialValueText("none (image encoder frozen)")
        self.train_lora_spin.setToolTip("LoRA rank: adapters on the attention layers, the rest of the network fixed "
                                        "(needs peft; 8 is a common choice). None: the decoder and memory learn, the "
                                        "image encoder stays frozen.")
        form.addRow("LoRA rank", self.train_lora_spin)
        row = QHBoxLayout()
        self.train_out_edit = QLineEdit()
        self.train_out_edit.setToolTip("The fine-tuned checkpoint; its log (.csv), curves (.png) and resumable state "
                                       "(.train.pt) are written beside it.")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_train_out)
        row.addWidget(self.train_out_edit)
        row.addWidget(browse)
        form.addRow("Output", row)
        self.train_button = QPushButton("Fine-tune")
        self.train_button.setToolTip("Fine-tune the model (and checkpoint) above on the image and these labels, in "
                                     "the background; Cancel stops it. Then the new checkpoint is used.")
        self.train_button.clicked.connect(lambda: self.finetune())
        form.addRow(self.train_button)
        self.finetune_box.setVisible(False)
        layout.addWidget(self.finetune_box)

        def toggle(on: bool) -> None:
            self.finetune_box.setVisible(on)
            self.finetune_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

        self.finetune_toggle.toggled.connect(toggle)

    def _browse_train_out(self) -> None:
        start = self.train_out_edit.text().strip() or str(self.default_train_out())
        path, _ = QFileDialog.getSaveFileName(self, "Fine-tuned checkpoint", start, "PyTorch checkpoint (*.pt)")
        if path:
            self.train_out_edit.setText(path)

    def default_train_out(self) -> Path:
        """``<image>_finetuned.pt`` beside the image's file (else in the current folder), numbered so that
        no earlier checkpoint or run state is overwritten."""
        layer = self.image_layer
        source = getattr(getattr(layer, "source", None), "path", None) if layer is not None else None
        folder = Path(source).parent if source else Path.cwd()
        stem = re.sub(r"[^\w.-]+", "_", str(layer.name)).strip("._") if layer is not None else ""
        stem = f"{stem or 'sam2'}_finetuned"
        out, n = folder / f"{stem}.pt", 2
        while out.exists() or out.with_suffix(".train.pt").exists():
            out, n = folder / f"{stem}-{n}.pt", n + 1
        return out

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

    # ================================================================== layers
    def _image_choices(self, *_):
        from napari.layers import Image

        return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _labels_choices(self, *_):
        from napari.layers import Labels

        return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, Labels)]

    def _refresh_layers(self, event=None) -> None:
        self.image_choice.reset_choices()
        layers = [c for c in self.image_choice.choices if c is not None]
        if self.image_choice.value is None and layers:
            self.image_choice.value = layers[0]
        self.train_labels_choice.reset_choices()
        inserted = getattr(event, "value", None)
        if inserted is not None and inserted is self.labels_layer:
            self.train_labels_choice.value = inserted  # the masklets are what one corrects and trains on
        elif self.train_labels_choice.value is None:
            labels = [c for c in self.train_labels_choice.choices if c is not None]
            if labels:
                self.train_labels_choice.value = self.labels_layer or labels[0]
        self._image_changed()

    def _layer_removed(self, event=None) -> None:
        view = self.annotator.view
        if view is not None and view.layer not in self.viewer.layers:
            if self.annotator.busy:
                _notify_info(f"SAM2: image layer '{view.name}' was removed; the work on it was stopped.")
            self.annotator.stop(f"image layer '{view.name}' was removed")
        self._refresh_layers()

    def _image_data_changed(self, event=None) -> None:
        view = self.annotator.view
        if view is not None and event is not None and getattr(event, "source", None) is view.layer:
            self.annotator.stop(f"the data of image layer '{view.name}' was replaced")
            self._refresh_layers()

    @property
    def image_layer(self):
        return self.image_choice.value

    def _image_changed(self, *args) -> None:
        layer = self.image_layer
        self.axis_combo.clear()
        if layer is None:
            return
        self.train_out_edit.setPlaceholderText(str(self.default_train_out()))  # what an empty field means
        if layer not in self._connected:
            layer.events.data.connect(self._image_data_changed)
            self._connected.add(layer)
        data = layer_array(layer)
        lead = data.ndim - (3 if layer.rgb else 2)
        for d in range(lead):
            self.axis_combo.addItem(f"axis {d} ({data.shape[d]})", d)
        n = data.shape[0] if lead else 1
        for spin in (self.start_spin, self.end_spin):
            spin.setRange(0, max(n - 1, 0))
        self.start_spin.setValue(0)
        self.end_spin.setValue(max(n - 1, 0))

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

    # ================================================================== the video in view
    def current_view(self, tell: bool = True) -> StackView | None:
        """The video to segment (the chosen image, axis and the slice in view of the other axes)."""
        layer = self.image_layer
        if layer is None:
            if tell:
                _notify_error("no image layer: open a time-lapse (or a 3D stack, or an image) first, then choose it "
                              "as 'Image'.")
            return None
        data = layer_array(layer)
        lead = data.ndim - (3 if layer.rgb else 2)
        axis = self.axis_combo.currentData()
        axis = 0 if axis is None else int(axis)
        step = self.viewer.dims.current_step
        offset = self.viewer.dims.ndim - (lead + 2)  # the viewer's extra leading dims (an RGB axis is not one)
        fixed = {d: int(step[d + offset]) for d in range(lead) if d != axis}
        view = StackView(layer, axis, fixed)
        if view.same_as(self.annotator.view):
            return self.annotator.view
        return view

    def _use_view(self) -> StackView | None:
        view = self.current_view()
        if view is not None:
            self.annotator.choose_model(self.model_choice())
            self.annotator.show(view)
        return view

    def current_frame(self) -> int:
        view = self.annotator.view or self.current_view(tell=False)
        if view is None or not view.lead:
            return 0
        offset = self.viewer.dims.ndim - view.ndim
        return int(self.viewer.dims.current_step[view.axis + offset])

    def model_choice(self) -> ModelChoice:
        return ModelChoice(self.model_combo.currentData(), self.checkpoint_edit.text().strip() or None,
                           self.device_combo.currentText(), int(self.size_spin.value()),
                           self.precision_combo.currentText())

    def ensure_layers(self) -> bool:
        """Create the prompt layers and the masklets layer if missing (True when ready)."""
        view = self._use_view()
        if view is None:
            return False
        geometry = view.geometry()
        labels = self.labels_layer
        if labels is None or tuple(labels.data.shape) != view.labels_shape:
            if labels is not None:
                self.viewer.layers.remove(labels)
            labels = self.viewer.add_labels(np.zeros(view.labels_shape, dtype=np.uint32), name=LABELS_NAME,
                                            opacity=0.5, **geometry)
            labels.selected_label = 1
        for old in (self.points_layer, self.boxes_layer):
            if old is not None and old.ndim != view.ndim:  # made for another image
                self.viewer.layers.remove(old)
        size = max(4, min(view.height, view.width) / 25)
        if self.points_layer is None:
            pts = self.viewer.add_points(
                np.zeros((0, view.ndim)), name=POINTS_NAME, ndim=view.ndim, size=size,
                features={"obj_id": np.zeros(0, dtype=int), "positive": np.zeros(0, dtype=bool)},
                face_color=POSITIVE_COLOR, border_color="white", **geometry,
            )
            pts.mode = "add"
        if self.boxes_layer is None:
            self.viewer.add_shapes(
                None, ndim=view.ndim, name=BOXES_NAME, shape_type="rectangle", edge_color="yellow",
                face_color="transparent", edge_width=max(1, min(view.height, view.width) / 200),
                features={"obj_id": np.zeros(0, dtype=int)}, **geometry,
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
        self.objects.select(obj)
        self._show_mode()

    def toggle_positive(self) -> None:
        """Switch new clicks between positive and negative (key 't' in the points layer)."""
        self.positive = not self.positive
        pts = self.points_layer
        if pts is not None:
            pts.feature_defaults = {"obj_id": self.obj_id, "positive": self.positive}
            pts.current_face_color = POSITIVE_COLOR if self.positive else NEGATIVE_COLOR
        self._show_mode()

    # ================================================================== asking for work
    def _ask(self, what: str, make) -> Task | None:
        try:
            return make()
        except AnnotatorError as exc:
            _notify_error(str(exc))
        except ValueError as exc:
            _notify_error(f"{what}: {exc}")
        return None

    def _prompts_changed(self, event=None) -> None:
        action = getattr(event, "action", None)
        if action is not None and str(getattr(action, "value", action)) in ("adding", "removing", "changing"):
            return
        pts = self.points_layer
        if pts is not None and len(pts.data) and not self._updating:
            pos = feature_column(pts, "positive", True, len(pts.data))
            self._updating = True
            try:
                pts.face_color = [POSITIVE_COLOR if p else NEGATIVE_COLOR for p in pos]
            finally:
                self._updating = False
        self.apply_prompts()

    def apply_prompts(self) -> Task | None:
        """Hand the layers' prompts to the annotator; their frames' masks come when the worker has them."""
        if self._use_view() is None:
            return None
        return self.annotator.sync(self.points_layer, self.boxes_layer)

    def load_model(self) -> Task | None:
        self.annotator.choose_model(self.model_choice())
        return self._ask("load", self.annotator.load)

    def use_painted_mask(self) -> Task | None:
        """The selected label as painted on the frame in view becomes that object's mask prompt."""
        if not self.ensure_layers():
            return None
        view, t, obj = self.annotator.view, self.current_frame(), self.obj_id
        mask = np.asarray(view.labels_video(self.labels_layer.data)[t]) == obj
        return self._ask("mask prompt", lambda: self.annotator.use_mask(t, obj, mask))

    def segment_all(self, t: int | None = None, auto: dict | None = None) -> Task | None:
        """One object per cell the automatic mask generator finds on the frame in view."""
        if not self.ensure_layers():
            return None
        t = self.current_frame() if t is None else int(t)
        auto = {"points_per_side": int(self.points_spin.value())} if auto is None else auto
        frame = np.asarray(self.annotator.view.labels_video(self.labels_layer.data)[t])
        return self._ask("segment all", lambda: self.annotator.segment_all(t, auto, frame))

    def lineage_options(self) -> LineageOptions:
        return LineageOptions(self.new_every_spin.value() if self.new_cells_check.isChecked() else None,
                              self.divisions_check.isChecked(), self.lost_after_spin.value() or None)

    def _range(self, start, end) -> tuple[int, int]:
        lo = self.start_spin.value() if start is None else int(start)
        hi = self.end_spin.value() if end is None else int(end)
        return min(lo, hi), max(lo, hi)

    def propagate(self, direction: str | None = None, start: int | None = None, end: int | None = None) -> Task | None:
        """Track every object through frames ``start..end`` in the worker; returns its task."""
        if not self.ensure_layers():
            return None
        self.apply_prompts()
        lo, hi = self._range(start, end)
        direction = direction or self.direction_combo.currentText()
        return self._ask("propagate", lambda: self.annotator.propagate(direction, lo, hi, self.lineage_options()))

    def precompute(self, start: int | None = None, end: int | None = None) -> Task | None:
        """Encode frames ``start..end`` into the feature cache in the worker."""
        if self._use_view() is None:
            return None
        lo, hi = self._range(start, end)
        return self._ask("precompute", lambda: self.annotator.precompute(lo, hi))

    def finetune(self, out=None, steps: int | None = None) -> Task | None:
        """Fine-tune the model on the image and the chosen labels layer in the worker; on success the
        session goes on with the new checkpoint. Output: ``out``, the field, or :meth:`default_train_out`."""
        if self._use_view() is None:
            return None
        layer = self.train_labels_choice.value
        if layer is None:
            _notify_error("no Labels layer to fine-tune on: segment and correct some cells in 'SAM2 masklets' "
                          "(or open your own labels) first.")
            return None
        path = out or self.train_out_edit.text().strip() or self.default_train_out()
        steps = int(self.train_steps_spin.value()) if steps is None else int(steps)
        frames = int(self.train_frames_spin.value())
        options = {"lora": self.train_lora_spin.value() or None, **self.train_options}
        data = layer_array(layer)  # a reference: the worker reads (and copies) it
        return self._ask("fine-tune", lambda: self.annotator.train(data, path, steps=steps, num_frames=frames,
                                                                   **options))

    def cancel(self) -> None:
        """Stop the running task after its current step, and drop the waiting ones."""
        if self.annotator.cancel():
            self.status.setText("cancelling ...")

    def clear_object(self, obj_id: int | None = None) -> Task | None:
        """Remove one object (default: the selected label): its prompts, its session and its masks."""
        obj = self.obj_id if obj_id is None else int(obj_id)
        self._remove_prompts(lambda ids: ids == obj)
        return self._ask("clear", lambda: self.annotator.remove_object(obj))

    def reset(self) -> Task | None:
        """Remove every prompt, object and mask."""
        self._remove_prompts(lambda ids: np.ones(len(ids), bool))
        return self._ask("reset", self.annotator.reset)

    def _remove_prompts(self, which) -> None:
        for layer in (self.points_layer, self.boxes_layer):
            if layer is not None and len(layer.data):
                ids = feature_column(layer, "obj_id", 1, len(layer.data))
                drop = np.asarray(which(ids), bool)
                if drop.any():
                    layer.selected_data = set(np.flatnonzero(drop).tolist())
                    layer.remove_selected()

    # ================================================================== outputs
    def _labels_video(self):
        labels, view = self.labels_layer, self.annotator.view
        if labels is None or view is None:
            return None
        return view.labels_video(labels.data)

    def make_tracks(self) -> Task | None:
        """A Tracks layer (track id = object id, lineage as its graph) from the masklets, made in the worker."""
        video = self._labels_video()
        if video is None:
            _notify_error("no masklets yet: add prompts and propagate first.")
            return None
        view, parents = self.annotator.view, dict(self.annotator.parents)
        snapshot = np.array(video, copy=True)

        def compute(task):
            from .tracking import add_parents, napari_tracks, tracks_graph, tracks_table

            table = add_parents(tracks_table(snapshot), parents)
            data, graph = napari_tracks(table), tracks_graph(table)
            self._gui.post(lambda: self._show_tracks(view, data, graph))

        return self._ask("tracks", lambda: self.annotator.queue.submit(Task("tracks layer", compute)))

    def _show_tracks(self, view: StackView, data, graph) -> None:
        if len(data) == 0:
            _notify_error("the masklets are empty: nothing to track.")
            return
        if TRACKS_NAME in self.viewer.layers:
            self.viewer.layers.remove(TRACKS_NAME)
        geometry = view.geometry()
        keep = [view.axis if view.lead else 0, view.lead, view.lead + 1] if view.lead else None
        kwargs = {}
        if keep is not None:
            kwargs = {k: [v[i] for i in keep] for k, v in geometry.items()}
        self.viewer.add_tracks(data, graph=graph, name=TRACKS_NAME, tail_length=10, **kwargs)

    def export(self, path, fmt: str | None = None) -> Task | None:
        """Write the masklets as OME-Zarr (``.zarr``), TIFF (``.tif``) or a CTC folder, in the worker."""
        video = self._labels_video()
        if video is None:
            _notify_error("no masklets to export: add prompts and propagate first.")
            return None
        return self._ask("export", lambda: self.annotator.export(Path(path), fmt, video))

    def _export_dialog(self) -> None:
        formats = {"OME-Zarr (*.ome.zarr)": "zarr", "TIFF (*.tif)": "tiff",
                   "Cell Tracking Challenge folder (*_RES)": "ctc",
                   "GEFF graph, labels as OME-Zarr beside it (*.geff)": "geff"}
        path, chosen = QFileDialog.getSaveFileName(self, "Export masklets", "masklets.ome.zarr", ";;".join(formats))
        if path:
            self.export(path, formats.get(chosen, "ctc"))

    # ================================================================== what the annotator tells (GUI thread)
    def show_frame(self, t: int, labels: np.ndarray) -> None:
        layer, view = self.labels_layer, self.annotator.view
        if layer is None or view is None:
            return
        if tuple(layer.data.shape) != view.labels_shape:
            return
        layer.data[view.frame_index(t)] = labels
        layer.refresh()

    def erase_objects(self, obj_ids) -> None:
        video = self._labels_video()
        if video is None:
            return
        if obj_ids is None:
            video[...] = 0
        else:
            video[np.isin(video, list(obj_ids))] = 0
        self.labels_layer.refresh()

    def show_status(self, text: str) -> None:
        self.status.setText(text)

    def model_ready(self, text: str) -> None:
        self.status.setText(text)
        self._mark_cached()

    def model_trained(self, checkpoint: str | None, text: str) -> None:
        if checkpoint is not None:  # what the next prompt asks for is what the session now runs
            self.checkpoint_edit.setText(checkpoint)
        self.status.setText(text)
        _notify_info(f"SAM2: {text}")

    def show_objects(self, objects: list[ObjectInfo]) -> None:
        self.objects.set_rows(objects)

    def task_started(self, task: Task) -> None:
        from napari.utils import progress

        # napari's progress runs the event loop while it builds its bar, so the task's later messages
        # (even its end) may arrive inside this call: keep a place, and close the bar if it ended
        self._progress[task.number] = None
        bar = progress(total=task.total or 0, desc=f"SAM2: {task.name}")
        if task.number in self._progress:
            self._progress[task.number] = bar
        else:
            bar.close()
        self._show_work()

    def task_progress(self, task: Task) -> None:
        bar = self._progress.get(task.number)
        if bar is not None:
            if task.total is not None and bar.total != task.total:
                bar.total = task.total
            if task.message:
                bar.set_description(f"SAM2: {task.name}: {task.message}")
            bar.update(task.done - bar.n)
        if task.total:
            self.progress.setRange(0, task.total)
            self.progress.setValue(min(task.done, task.total))
        self._show_work()

    def task_finished(self, task: Task, outcome: str, error) -> None:
        bar = self._progress.pop(task.number, None)
        if bar is not None:
            bar.close()

        if outcome == "failed":
            message = str(error) if isinstance(error, AnnotatorError) else f"{task.name} failed: {type(error).__name__}: {error}"
            _notify_error(message)
            self.status.setText(message)
        elif outcome == "cancelled" and (task.done or task.note) and not self.status.text().startswith("stopped:"):
            self.status.setText(f"{task.name}: cancelled after {task.done} of {task.total or '?'}; "
                                f"{task.note or 'what was done is kept'}")
        self._show_work()

    def _show_work(self) -> None:
        queue = self.annotator.queue
        running, waiting = queue.running, queue.pending
        busy = running is not None or bool(waiting)
        self.cancel_button.setEnabled(busy)
        parts = []
        if running is not None:
            parts.append(f"working: {running.name}" + (f" ({running.done}/{running.total})" if running.total else "")
                         + (f": {running.message}" if running.message else ""))
        if waiting:
            parts.append("waiting: " + ", ".join(t.name for t in waiting))
        self.work_label.setText(" · ".join(parts))

    # ================================================================== the object list
    def _color_of(self, obj_id: int) -> tuple:
        labels = self.labels_layer
        if labels is None:
            return (0.5, 0.5, 0.5, 1.0)
        return tuple(float(c) for c in labels.colormap.map(np.array([obj_id]))[0])

    def _select_object(self, obj_id: int) -> None:
        labels = self.labels_layer
        if labels is not None and labels.selected_label != obj_id:
            labels.selected_label = obj_id

    def _jump_to(self, t: int) -> None:
        view = self.annotator.view
        if view is None or not view.lead:
            return
        offset = self.viewer.dims.ndim - view.ndim
        self.viewer.dims.set_current_step(view.axis + offset, int(t))
