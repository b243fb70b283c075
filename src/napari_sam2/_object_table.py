"""The object list of the widget: one row per object, its colour, frames, and object-present score over time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .annotator import ObjectInfo

__all__ = ["ObjectTable"]

SPARK_W, SPARK_H = 120, 18
COLUMNS = ("object", "frames", "absent on", "present score")


def sparkline(scores: np.ndarray, width: int = SPARK_W, height: int = SPARK_H) -> QPixmap:
    """The object-present logit over the frames: green above 0 (seen), red at or below (occluded / gone),
    grey where not computed."""
    pix = QPixmap(width, height)
    pix.fill(QColor(0, 0, 0, 0))
    n = len(scores)
    if n == 0:
        return pix
    painter = QPainter(pix)
    mid = height / 2
    painter.setPen(QPen(QColor(128, 128, 128), 1))
    painter.drawLine(0, int(mid), width, int(mid))
    finite = np.abs(scores[np.isfinite(scores)])
    top = float(finite.max()) if finite.size else 1.0
    step = width / n
    for t, s in enumerate(scores):
        x0, w = int(t * step), max(1, int(step))
        if not np.isfinite(s):
            painter.fillRect(x0, int(mid) - 1, w, 2, QColor(90, 90, 90))
            continue
        h = max(1, int(abs(s) / max(top, 1e-6) * (mid - 1)))
        color = QColor(60, 200, 90) if s > 0 else QColor(230, 60, 60)
        painter.fillRect(x0, int(mid) - h if s > 0 else int(mid), w, h, color)
    painter.end()
    return pix


class ObjectTable(QWidget):
    """Rows of :class:`~napari_sam2.annotator.ObjectInfo`; selecting one calls ``on_select(obj_id)``."""

    def __init__(self, on_select: Callable[[int], None], on_delete: Callable[[int], None],
                 on_jump: Callable[[int], None], color_of: Callable[[int], tuple]):
        super().__init__()
        self._on_select, self._on_delete, self._on_jump, self._color_of = on_select, on_delete, on_jump, color_of
        self.rows: list[ObjectInfo] = []
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.itemSelectionChanged.connect(self._selected)
        self.table.setMinimumHeight(110)
        layout.addWidget(self.table)
        buttons = QHBoxLayout()
        self.delete_button = QPushButton("Delete")
        self.first_button = QPushButton("First frame")
        self.last_button = QPushButton("Last frame")
        self.delete_button.clicked.connect(lambda: self._act(self._on_delete))
        self.first_button.clicked.connect(lambda: self._jump(first=True))
        self.last_button.clicked.connect(lambda: self._jump(first=False))
        for b in (self.delete_button, self.first_button, self.last_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)

    def set_rows(self, rows: list[ObjectInfo]) -> None:
        chosen = self.selected_id()
        self.rows = list(rows)
        table = self.table
        table.blockSignals(True)
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            name = f"{row.obj_id}" + (f" (from {row.parent})" if row.parent else "")
            item = QTableWidgetItem(name)
            r, g, b = (int(255 * c) for c in self._color_of(row.obj_id)[:3])
            item.setBackground(QColor(r, g, b))
            item.setForeground(QColor(0, 0, 0) if (r + g + b) > 380 else QColor(255, 255, 255))
            item.setData(Qt.ItemDataRole.UserRole, row.obj_id)
            table.setItem(i, 0, item)
            table.setItem(i, 1, QTableWidgetItem(row.frames_drawn))
            absent = row.absent_frames
            text = ", ".join(map(str, absent[:6])) + (" ..." if len(absent) > 6 else "")
            table.setItem(i, 2, QTableWidgetItem(text or "-"))
            spark = QLabel()
            spark.setPixmap(sparkline(row.scores))
            spark.setToolTip("object-present score per frame: green = seen, red = absent (occluded or gone)")
            table.setCellWidget(i, 3, spark)
            if row.obj_id == chosen:
                table.selectRow(i)
        table.blockSignals(False)
        table.resizeColumnsToContents()

    def selected_id(self) -> int | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def select(self, obj_id: int) -> None:
        for i, row in enumerate(self.rows):
            if row.obj_id == obj_id:
                self.table.selectRow(i)
                return

    def row_of(self, obj_id: int) -> ObjectInfo | None:
        return next((r for r in self.rows if r.obj_id == obj_id), None)

    def _selected(self) -> None:
        obj = self.selected_id()
        if obj is not None:
            self._on_select(obj)

    def _act(self, action: Callable[[int], None]) -> None:
        obj = self.selected_id()
        if obj is not None:
            action(obj)

    def _jump(self, first: bool) -> None:
        row = self.row_of(self.selected_id()) if self.selected_id() is not None else None
        if row is not None and row.first is not None:
            self._on_jump(row.first if first else row.last)
