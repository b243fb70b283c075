#!/usr/bin/env python
"""Make the screenshots of docs/napari.md with the widget of this repository (under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots.py

Random weights (this machine has no official checkpoint): clicks and boxes give empty masks, but a
mask prompt is shown as the mask on its frame, so the screenshots use painted masks (taken from the
sample's ground truth) for two cells and a click and a box for two more.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> int:
    os.environ.setdefault("NAPARI_SAM2_PRECISION", "fp32")
    import napari
    import torch
    from heartbeat import wait_idle
    from qtpy.QtWidgets import QApplication

    from napari_sam2._sample_data import make_sample_data
    from napari_sam2._widget import SAM2Widget
    from napari_sam2.build import build_model

    out = HERE / "images"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_SAM2_FEATURES"] = str(Path(tmp) / "features")
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "random.pt"
        torch.save({"model": build_model("sam2.1_hiera_tiny", pretrained=False).state_dict()}, checkpoint)
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1500, 950)
        layers = make_sample_data(n_frames=12, shape=(128, 128))
        for data, meta, kind in layers:
            getattr(viewer, f"add_{kind}")(data, **meta)
        truth = layers[1][0]
        viewer.layers["ground truth"].visible = False
        widget = SAM2Widget(viewer)
        viewer.window.add_dock_widget(widget, name="SAM2 video segmentation")
        widget.checkpoint_edit.setText(str(checkpoint))
        widget.device_combo.setCurrentText("cpu")
        widget.size_spin.setValue(256)
        app = QApplication.instance()

        def shot(name):
            wait_idle(widget)
            for _ in range(10):
                app.processEvents()
            viewer.screenshot(str(out / name), canvas_only=False, flash=False)
            print("wrote", out / name)

        shot("napari_01_widget.png")
        widget.load_model()
        widget.ensure_layers()
        viewer.dims.set_current_step(0, 0)
        cells = [int(c) for c in np.unique(truth[0]) if c][:4]
        for obj, cell in enumerate(cells[:2], start=1):  # painted masks (here: the ground truth's)
            widget.labels_layer.data[0][truth[0] == cell] = obj
            widget.labels_layer.selected_label = obj
            widget.use_painted_mask()
        wait_idle(widget)
        if len(cells) > 2:
            ys, xs = np.nonzero(truth[0] == cells[2])
            widget.labels_layer.selected_label = 3
            widget.points_layer.add([[0, ys.mean(), xs.mean()]])
        if len(cells) > 3:
            ys, xs = np.nonzero(truth[0] == cells[3])
            widget.labels_layer.selected_label = 4
            widget.boxes_layer.add_rectangles(np.array([[0, ys.min(), xs.min()], [0, ys.min(), xs.max()],
                                                        [0, ys.max(), xs.max()], [0, ys.max(), xs.min()]], float))
        viewer.layers.selection.active = widget.labels_layer
        shot("napari_02_prompts.png")
        widget.propagate(direction="forward")
        wait_idle(widget)
        viewer.dims.set_current_step(0, 6)
        widget.objects.table.selectRow(0)
        shot("napari_03_propagated.png")
        viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
