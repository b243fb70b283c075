"""Prompts for a time-lapse: clicks, boxes and masks, from napari layers, tables or files.

Coordinates follow napari: ``(t, y, x)`` with ``t`` the frame index and ``y, x`` pixel indices
(row, column). :class:`Prompts` converts them to the ``(x, y)`` order of the SAM2 video predictor
when it applies them, so that nobody has to.

Accepted forms (every table may also be a ``dict`` of columns or a list of row dicts):

- **points**: an ``(N, 3)`` array ``t, y, x`` (a napari Points layer's ``data``), ``(N, 4)``
  ``t, y, x, obj_id`` or ``(N, 5)`` ``t, y, x, obj_id, positive``; or a table with columns
  ``t, y, x`` and optionally ``obj_id``, ``positive``. Object ids and positive/negative can also be
  given per point with ``obj_ids=`` and ``positive=``. Without object ids every point is an object
  of its own (one click per cell).
- **boxes**: an ``(N, 5)`` array ``t, y0, x0, y1, x1``, ``(N, 6)`` with ``obj_id`` last, the
  ``(N, 4, 3)`` corner arrays of a napari Shapes layer's rectangles, or a table with columns
  ``t, y0, x0, y1, x1`` and optionally ``obj_id``. Without ids every box is an object of its own.
- **masks**: a label image of one frame, ``(Y, X)``: every label > 0 becomes the mask prompt of the
  object with that id, on frame ``mask_frame`` (default 0).

Column names are case-insensitive; ``frame`` or napari's ``axis-0, axis-1, axis-2`` are read as
``t, y, x`` and ``label`` as ``obj_id`` (so rows of a tracks table are valid point prompts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = [
    "PromptError",
    "Prompt",
    "Prompts",
    "build_prompts",
    "points_table",
    "boxes_table",
    "mask_prompts",
    "read_prompts_file",
    "PROMPT_FILE_SUFFIXES",
]

PROMPT_FILE_SUFFIXES = (".csv", ".json", ".tif", ".tiff")

_ALIASES = {
    "t": ("t", "frame", "axis-0", "time"),
    "y": ("y", "axis-1"),
    "x": ("x", "axis-2"),
    "obj_id": ("obj_id", "object_id", "label"),
    "positive": ("positive",),
    "y0": ("y0",),
    "x0": ("x0",),
    "y1": ("y1",),
    "x1": ("x1",),
}
_TRUE = {"1", "true", "yes", "y", "positive", "pos", "+"}
_FALSE = {"0", "false", "no", "n", "negative", "neg", "-"}


def _show(value: Any) -> str:
    """A value for an error message: numpy scalars as Python ones, whole floats as integers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isfinite(value) and value == round(value):
        value = int(value)
    return repr(value)


class PromptError(ValueError):
    """Prompts that cannot be used: wrong shape, missing columns, outside the stack, ..."""


@dataclass
class Prompt:
    """Everything given for one object on one frame.

    Attributes
    ----------
    t, obj_id : int
        Frame index and object id (>= 1; it becomes the label value).
    points : numpy.ndarray, (N, 2) float
        Clicks as ``(y, x)`` pixel coordinates (napari order).
    positive : numpy.ndarray, (N,) bool
        True for a click on the object, False for a click on background.
    box : tuple of 4 float or None
        ``(y0, x0, y1, x1)``.
    mask : numpy.ndarray (Y, X) bool or None
    point_sources, box_source, mask_source
        Where each click, the box and the mask came from (e.g. ``"points row 3"``), for errors.
    """

    t: int
    obj_id: int
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    point_sources: list[str] = field(default_factory=list)
    box_source: str | None = None
    mask_source: str | None = None

    @property
    def source(self) -> str:
        """Where the prompt came from (its first row), for error messages."""
        for s in (self.box_source, self.mask_source, *self.point_sources):
            if s:
                return s
        return f"prompt for object {self.obj_id} on frame {self.t}"

    def xy_points(self) -> np.ndarray | None:
        """The clicks as ``(x, y)`` pairs, the order of the SAM2 predictor (None if no click)."""
        if len(self.points) == 0:
            return None
        return np.ascontiguousarray(self.points[:, ::-1], dtype=np.float32)

    def xyxy_box(self) -> list[float] | None:
        """The box as ``[x0, y0, x1, y1]``, the order of the SAM2 predictor."""
        if self.box is None:
            return None
        y0, x0, y1, x1 = self.box
        return [x0, y0, x1, y1]


# ------------------------------------------------------------------------------------ tables
def _as_frame(data: Any, what: str) -> pd.DataFrame | None:
    """A table (DataFrame, dict of columns, list of row dicts) as a DataFrame with lower-case
    names; None if ``data`` is an array instead."""
    if isinstance(data, pd.DataFrame):
        df = data.copy()
    elif isinstance(data, Mapping):
        try:
            df = pd.DataFrame({k: np.atleast_1d(np.asarray(v)) for k, v in data.items()})
        except ValueError as exc:
            raise PromptError(f"{what}: the columns of the dict must have equal lengths ({exc})") from exc
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, Mapping) for r in data):
        df = pd.DataFrame(list(data))
    else:
        return None
    df.columns = [str(c).strip().lower() for c in df.columns]
    return df


def _pick(df: pd.DataFrame, name: str) -> str | None:
    for alias in _ALIASES[name]:
        if alias in df.columns:
            return alias
    return None


def _row_names(df: pd.DataFrame, what: str) -> list[str]:
    if "_row" in df.columns:
        return [str(r) for r in df["_row"]]
    return [f"{what} row {i}" for i in df.index]


def _numeric(df: pd.DataFrame, col: str, rows: list[str], what: str, kind: str) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PromptError(f"{rows[i]}: {kind} {_show(df[col].iloc[i])} in column {col!r} is not a finite number")
    return values


def _integers(values: np.ndarray, rows: list[str], name: str) -> np.ndarray:
    frac = values != np.round(values)
    if frac.any():
        i = int(np.flatnonzero(frac)[0])
        raise PromptError(f"{rows[i]}: {name} must be a whole number, got {values[i]:g}")
    return values.astype(np.int64)


def _bools(values: Iterable, rows: list[str], name: str = "positive") -> np.ndarray:
    out = []
    for row, v in zip(rows, values):
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
            continue
        text = str(v).strip().lower()
        if isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v) and float(v) in (0.0, 1.0):
            out.append(bool(v))
        elif text in _TRUE:
            out.append(True)
        elif text in _FALSE:
            out.append(False)
        else:
            raise PromptError(f"{row}: {name} must be 1/true (click on the object) or 0/false "
                              f"(click on background), got {_show(v)}")
    return np.asarray(out, dtype=bool)


def _missing(df: pd.DataFrame, names: Iterable[str], what: str, source: str | None) -> None:
    missing = [n for n in names if _pick(df, n) is None]
    if missing:
        where = f" in {source}" if source else ""
        raise PromptError(
            f"{what}{where} lack column(s) {', '.join(missing)}; found columns "
            f"{', '.join(map(repr, [c for c in df.columns if c != '_row'])) or 'none'}. "
            + ("Points need t, y, x (and optionally obj_id, positive)." if what == "points" else
               "Boxes need t, y0, x0, y1, x1 (and optionally obj_id).")
        )


def points_table(points: Any, obj_ids: Any = None, positive: Any = None, source: str | None = None) -> pd.DataFrame:
    """Points in any accepted form as a DataFrame ``t, y, x, obj_id, positive, _row``.

    ``obj_id`` is ``-1`` where no id was given (filled in by :func:`build_prompts`).
    """
    what = "points"
    df = _as_frame(points, what)
    if df is None:
        try:
            arr = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"points must be an (N, 3) array of t, y, x, or a table; could not read them as an array of "
                              f"numbers (rows of different lengths? use NaN for a missing obj_id) ({exc})") from exc
        if arr.ndim == 1 and arr.size in (3, 4, 5):
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] not in (3, 4, 5):
            raise PromptError(
                f"points must be an (N, 3) array of t, y, x (napari's order; (N, 4) adds obj_id, (N, 5) "
                f"adds positive), got shape {arr.shape}. For 2D points (y, x) add the frame index as "
                "first column."
            )
        cols = ["t", "y", "x", "obj_id", "positive"][: arr.shape[1]]
        df = pd.DataFrame(arr, columns=cols)
    _missing(df, ("t", "y", "x"), what, source)
    rows = _row_names(df, what)
    n = len(df)
    t = _integers(_numeric(df, _pick(df, "t"), rows, what, "frame"), rows, "the frame t")
    y = _numeric(df, _pick(df, "y"), rows, what, "y")
    x = _numeric(df, _pick(df, "x"), rows, what, "x")
    ids = np.full(n, -1, dtype=np.int64)
    id_col = _pick(df, "obj_id")
    if id_col is not None:
        ids = _ids(df[id_col].to_numpy(), rows)
    if obj_ids is not None:
        ids = _ids(_per_point(obj_ids, n, "obj_ids", "object id"), rows)
    pos = np.ones(n, dtype=bool)
    pos_col = _pick(df, "positive")
    if pos_col is not None:
        pos = _bools(df[pos_col].tolist(), rows)
    if positive is not None:
        pos = _bools(_per_point(positive, n, "positive", "value").tolist(), rows)
    return pd.DataFrame({"t": t, "y": y, "x": x, "obj_id": ids, "positive": pos, "_row": rows})


def _per_point(values, n: int, name: str, noun: str) -> np.ndarray:
    """One value per point: a single value is repeated for all n points."""
    given = np.atleast_1d(np.asarray(values))
    if given.size == 1 and n != 1:
        given = np.repeat(given, n)
    if given.shape != (n,):
        raise PromptError(f"{name} has {given.size} values for {n} points: give one {noun} per point")
    return given


def _ids(values: np.ndarray, rows: list[str]) -> np.ndarray:
    out = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
            continue  # no id: numbered later
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise PromptError(f"{rows[i]}: object id {_show(v)} is not a number; ids are integers >= 1") from None
        if not np.isfinite(f) or f != round(f) or f < 1:
            raise PromptError(f"{rows[i]}: object id {_show(v)} must be an integer >= 1 (it becomes the label value; 0 is background)")
        if f > np.iinfo(np.uint32).max:
            raise PromptError(f"{rows[i]}: object id {_show(v)} is too large (at most {np.iinfo(np.uint32).max})")
        out[i] = int(f)
    return out


def boxes_table(boxes: Any, box_ids: Any = None, source: str | None = None) -> pd.DataFrame:
    """Boxes in any accepted form as a DataFrame ``t, y0, x0, y1, x1, obj_id, _row``."""
    what = "boxes"
    df = _as_frame(boxes, what)
    if df is None:
        if isinstance(boxes, (list, tuple)) and boxes and all(np.ndim(b) == 2 for b in boxes):
            arr = np.stack([np.asarray(b, dtype=np.float64) for b in boxes]) if len({np.shape(b) for b in boxes}) == 1 else None
            if arr is None:
                raise PromptError("boxes given as napari shapes must all be (4, 3) corner arrays (t, y, x)")
        else:
            try:
                arr = np.asarray(boxes, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise PromptError(f"boxes must be an (N, 5) array of t, y0, x0, y1, x1, or a table ({exc})") from exc
        if arr.ndim == 3:  # napari Shapes rectangles: (N, 4 corners, (t, y, x))
            if arr.shape[1:] != (4, 3):
                raise PromptError(f"napari rectangles must be (N, 4, 3) corner arrays of (t, y, x), got shape {arr.shape}")
            ts = arr[:, :, 0]
            if np.any(ts.max(axis=1) != ts.min(axis=1)):
                i = int(np.flatnonzero(ts.max(axis=1) != ts.min(axis=1))[0])
                raise PromptError(f"boxes row {i}: the rectangle's corners lie on different frames {sorted(set(ts[i].tolist()))}")
            arr = np.column_stack([ts[:, 0], arr[:, :, 1].min(1), arr[:, :, 2].min(1), arr[:, :, 1].max(1), arr[:, :, 2].max(1)])
        if arr.ndim == 1 and arr.size in (5, 6):
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] not in (5, 6):
            raise PromptError(
                f"boxes must be an (N, 5) array of t, y0, x0, y1, x1 ((N, 6) adds obj_id) or napari "
                f"rectangles (N, 4, 3), got shape {arr.shape}"
            )
        df = pd.DataFrame(arr, columns=["t", "y0", "x0", "y1", "x1", "obj_id"][: arr.shape[1]])
    _missing(df, ("t", "y0", "x0", "y1", "x1"), what, source)
    rows = _row_names(df, what)
    n = len(df)
    t = _integers(_numeric(df, _pick(df, "t"), rows, what, "frame"), rows, "the frame t")
    coords = {k: _numeric(df, _pick(df, k), rows, what, k) for k in ("y0", "x0", "y1", "x1")}
    for i in range(n):
        if coords["y1"][i] < coords["y0"][i] or coords["x1"][i] < coords["x0"][i]:
            raise PromptError(
                f"{rows[i]}: box (y0, x0, y1, x1) = ({coords['y0'][i]:g}, {coords['x0'][i]:g}, "
                f"{coords['y1'][i]:g}, {coords['x1'][i]:g}) has y1 < y0 or x1 < x0"
            )
    ids = np.full(n, -1, dtype=np.int64)
    id_col = _pick(df, "obj_id")
    if id_col is not None:
        ids = _ids(df[id_col].to_numpy(), rows)
    if box_ids is not None:
        given = np.atleast_1d(np.asarray(box_ids))
        if given.shape != (n,):
            raise PromptError(f"box_ids has {given.size} values for {n} boxes: give one object id per box")
        ids = _ids(given, rows)
    return pd.DataFrame({"t": t, **coords, "obj_id": ids, "_row": rows})


def mask_prompts(masks: Any, mask_frame: int = 0, source: str | None = None) -> list[tuple[int, int, np.ndarray]]:
    """``(t, obj_id, mask)`` for every label > 0 of a one-frame label image ``(Y, X)``."""
    what = f"the mask label image{f' {source}' if source else ''}"
    arr = np.asarray(masks)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise PromptError(
            f"{what} must be a label image of one frame, (Y, X), got shape {arr.shape}; "
            "for a (T, Y, X) labels layer pass the frame you painted, e.g. labels[t], with mask_frame=t"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise PromptError(f"{what} must hold whole-number labels, got fractional or NaN values")
    elif arr.dtype.kind not in "iu":
        raise PromptError(f"{what} must be an integer label image, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise PromptError(f"{what} holds negative labels ({arr.min()}); labels are 0 (background) or object ids >= 1")
    try:
        t = int(mask_frame)
    except (TypeError, ValueError):
        raise PromptError(f"mask_frame must be a frame index, got {mask_frame!r}") from None
    ids = np.unique(arr)
    return [(t, int(i), arr == i) for i in ids[ids > 0]]


# ------------------------------------------------------------------------------------ files
def read_prompts_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read prompts from a CSV, JSON or label TIFF file.

    - CSV: rows with ``t, y, x`` (and optionally ``obj_id``, ``positive``) are points, rows with
      ``t, y0, x0, y1, x1`` (and optionally ``obj_id``) are boxes; a file may hold both (leave the
      other columns empty).
    - JSON: ``{"points": [...], "boxes": [...]}`` with row dicts or rows of numbers (as the arrays
      above), or a list of row dicts (as the CSV).
    - TIFF: a label image of one frame (``mask_frame`` says which frame; default 0).

    Returns
    -------
    dict
        ``{"points": DataFrame or None, "boxes": DataFrame or None, "masks": array or None}``.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompts file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptError(f"unknown prompts file type '{path.suffix}' for '{path}'; use CSV, JSON or a label TIFF")
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many types for bad files
            raise PromptError(f"prompts file '{path}' is not a readable TIFF label image ({type(exc).__name__}: {exc})") from exc
        if arr is None or np.asarray(arr).size == 0:
            raise PromptError(f"prompts file '{path}' is not a readable TIFF label image (no image data: corrupt or truncated?)")
        return {"points": None, "boxes": None, "masks": arr}
    if suffix == ".csv":
        try:
            df = pd.read_csv(path, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise PromptError(f"prompts file '{path}' is not a readable CSV table ({exc})") from exc
        df.columns = [str(c).strip().lower() for c in df.columns]
        df["_row"] = [f"'{path.name}' line {i + 2}" for i in range(len(df))]
        return _split_table(df, f"'{path}'")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompts file '{path}' is not valid JSON ({exc})") from exc
    out: dict[str, Any] = {"points": None, "boxes": None, "masks": None}
    if isinstance(data, list):
        if not all(isinstance(r, Mapping) for r in data):
            raise PromptError(f"prompts file '{path}': a JSON list must hold row objects such as "
                              '{"t": 0, "y": 10, "x": 12, "obj_id": 1}')
        df = pd.DataFrame(data)
        df.columns = [str(c).strip().lower() for c in df.columns]
        df["_row"] = [f"'{path.name}' item {i}" for i in range(len(df))]
        return _split_table(df, f"'{path}'")
    if not isinstance(data, Mapping) or not ({"points", "boxes"} & set(data)):
        raise PromptError(f"prompts file '{path}': expected a JSON object with \"points\" and/or \"boxes\", "
                          "or a list of row objects")
    unknown = sorted(set(data) - {"points", "boxes"})
    if unknown:
        raise PromptError(f"prompts file '{path}': unknown key(s) {', '.join(unknown)}; use \"points\" and \"boxes\"")
    for key, parse in (("points", points_table), ("boxes", boxes_table)):
        value = data.get(key)
        if value in (None, []):
            continue
        if isinstance(value, list) and all(isinstance(r, Mapping) for r in value):
            df = pd.DataFrame(value)
            df.columns = [str(c).strip().lower() for c in df.columns]
            df["_row"] = [f"'{path.name}' {key}[{i}]" for i in range(len(df))]
            out[key] = parse(df, source=f"'{path}'")
        elif isinstance(value, list):
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise PromptError(f"prompts file '{path}': \"{key}\" must be rows of numbers or row objects ({exc})") from exc
            df = parse(arr, source=f"'{path}'")
            df["_row"] = [f"'{path.name}' {key}[{i}]" for i in range(len(df))]
            out[key] = df
        else:
            raise PromptError(f"prompts file '{path}': \"{key}\" must be a list")
    return out


def _split_table(df: pd.DataFrame, source: str) -> dict[str, Any]:
    """One table holding point rows and/or box rows -> points and boxes tables."""
    out: dict[str, Any] = {"points": None, "boxes": None, "masks": None}
    has_points = _pick(df, "y") is not None or _pick(df, "x") is not None
    has_boxes = any(c in df.columns for c in ("y0", "x0", "y1", "x1"))
    if not has_points and not has_boxes:
        _missing(df, ("t", "y", "x"), "points", source)  # raises, naming what is missing
    if len(df) == 0:
        raise PromptError(f"prompts file {source} holds no prompt (it has no rows): add clicks or boxes to it, "
                          "or use --auto instead of --prompts to seed objects automatically")
    point_rows = df
    box_rows = df.iloc[0:0]
    if has_boxes:
        box_cols = [c for c in ("y0", "x0", "y1", "x1") if c in df.columns]
        is_box = df[box_cols].notna().any(axis=1)
        if has_points:
            pcols = [c for c in (_pick(df, "y"), _pick(df, "x")) if c is not None]
            is_point = df[pcols].notna().any(axis=1)
            both = is_box & is_point
            if both.any():
                row = df.loc[both, "_row"].iloc[0]
                raise PromptError(f"{row}: a row is either a point (y, x) or a box (y0, x0, y1, x1), not both")
            neither = ~is_box & ~is_point
            if neither.any():
                row = df.loc[neither, "_row"].iloc[0]
                raise PromptError(f"{row}: the row has neither y, x (a point) nor y0, x0, y1, x1 (a box)")
            point_rows = df[is_point]
        else:
            point_rows = df.iloc[0:0]
        box_rows = df[is_box] if has_points else df
    if len(point_rows):
        out["points"] = points_table(point_rows.reset_index(drop=True), source=source)
    if len(box_rows):
        out["boxes"] = boxes_table(box_rows.reset_index(drop=True), source=source)
    return out


# ------------------------------------------------------------------------------------ prompts
class Prompts:
    """All prompts of one stack, one :class:`Prompt` per (frame, object).

    Build with :func:`build_prompts`; check against the stack with :meth:`check`; give them to a
    video predictor with :meth:`apply`.
    """

    def __init__(self, items: dict[tuple[int, int], Prompt] | None = None):
        self.items: dict[tuple[int, int], Prompt] = dict(items or {})

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items[k] for k in sorted(self.items))

    def __repr__(self) -> str:
        return f"Prompts({len(self.items)} prompts, objects {self.obj_ids}, frames {self.frames})"

    @property
    def obj_ids(self) -> list[int]:
        return sorted({o for _, o in self.items})

    @property
    def frames(self) -> list[int]:
        return sorted({t for t, _ in self.items})

    def _get(self, t: int, obj_id: int) -> Prompt:
        key = (int(t), int(obj_id))
        if key not in self.items:
            self.items[key] = Prompt(t=int(t), obj_id=int(obj_id))
        return self.items[key]

    def check(self, n_frames: int, height: int, width: int) -> None:
        """Raise :class:`PromptError` naming the first prompt outside the ``(T, Y, X)`` stack.

        A click or box corner may lie anywhere on the frame's pixels, i.e. within
        ``-0.5 .. Y - 0.5`` and ``-0.5 .. X - 0.5`` (pixel centres are integers, as in napari).
        """
        shape = f"the stack is {n_frames} frames of {height} x {width} (Y x X) pixels"
        for p in self:
            src = p.source
            if not 0 <= p.t < n_frames:
                raise PromptError(f"{src}: frame t={p.t} is outside the stack: {shape} (frames 0..{n_frames - 1})")
            for i, (y, x) in enumerate(p.points):
                if not (-0.5 <= y <= height - 0.5 and -0.5 <= x <= width - 0.5):
                    where = p.point_sources[i] if i < len(p.point_sources) else src
                    raise PromptError(f"{where}: point (y={y:g}, x={x:g}) on frame {p.t} lies outside the frame: {shape}")
            if p.box is not None:
                y0, x0, y1, x1 = p.box
                if not (-0.5 <= y0 and y1 <= height - 0.5 and -0.5 <= x0 and x1 <= width - 0.5):
                    raise PromptError(
                        f"{p.box_source or src}: box (y0={y0:g}, x0={x0:g}, y1={y1:g}, x1={x1:g}) on frame {p.t} reaches outside the frame: {shape}"
                    )
            if p.mask is not None and p.mask.shape != (height, width):
                raise PromptError(f"{src}: the mask label image has shape {p.mask.shape} but the stack's frames are {(height, width)} (Y, X)")

    def apply(self, predictor, state, width: int, height: int) -> None:
        """Add every prompt to a :class:`~napari_sam2.VideoPredictor` session.

        Clicks and boxes are turned from napari ``(y, x)`` into the predictor's ``(x, y)`` and clipped
        to the frame; a mask prompt goes to ``add_new_mask``.
        """
        for p in self:
            if p.mask is not None:
                predictor.add_new_mask(state, frame_idx=p.t, obj_id=p.obj_id, mask=p.mask)
                continue
            pts = p.xy_points()
            labels = None
            if pts is not None:
                pts[:, 0] = np.clip(pts[:, 0], 0, width)
                pts[:, 1] = np.clip(pts[:, 1], 0, height)
                labels = p.positive.astype(np.int32)
            box = p.xyxy_box()
            if box is not None:
                box = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                       min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
            predictor.add_new_points_or_box(state, frame_idx=p.t, obj_id=p.obj_id, points=pts, labels=labels, box=box)


def build_prompts(points: Any = None, boxes: Any = None, masks: Any = None, *, obj_ids: Any = None,
                  positive: Any = None, box_ids: Any = None, mask_frame: int = 0) -> Prompts:
    """Collect points, boxes and a mask label image into :class:`Prompts` (see the module doc).

    Points and boxes without an object id each become an object of their own, numbered after
    the largest id given anywhere (mask labels included), points first. An object may have clicks
    and one box on a frame, or a mask there, not both.
    """
    pts = None
    if isinstance(points, pd.DataFrame) and "_row" in points.columns and {"t", "y", "x", "obj_id", "positive"} <= set(points.columns) and obj_ids is None and positive is None:
        pts = points
    elif points is not None:
        pts = points_table(points, obj_ids=obj_ids, positive=positive)
    elif obj_ids is not None or positive is not None:
        raise PromptError("obj_ids= and positive= describe points: give points= too")
    bxs = None
    if isinstance(boxes, pd.DataFrame) and "_row" in boxes.columns and {"t", "y0", "x0", "y1", "x1", "obj_id"} <= set(boxes.columns) and box_ids is None:
        bxs = boxes
    elif boxes is not None:
        bxs = boxes_table(boxes, box_ids=box_ids)
    elif box_ids is not None:
        raise PromptError("box_ids= describes boxes: give boxes= too")
    mks = mask_prompts(masks, mask_frame) if masks is not None else []

    used = [o for _, o, _ in mks]
    for table in (pts, bxs):
        if table is not None:
            used += [int(i) for i in table["obj_id"] if i > 0]
    next_id = max(used, default=0) + 1
    prompts = Prompts()

    if pts is not None:
        for row in pts.to_dict("records"):
            obj = int(row["obj_id"])
            if obj < 0:
                if not row["positive"]:
                    raise PromptError(f"{row['_row']}: a negative click (background) needs the id of the object it belongs to (obj_id)")
                obj, next_id = next_id, next_id + 1
            p = prompts._get(row["t"], obj)
            p.points = np.vstack([p.points, [[row["y"], row["x"]]]])
            p.positive = np.append(p.positive, bool(row["positive"]))
            p.point_sources.append(str(row["_row"]))
    if bxs is not None:
        for row in bxs.to_dict("records"):
            obj = int(row["obj_id"])
            if obj < 0:
                obj, next_id = next_id, next_id + 1
            p = prompts._get(row["t"], obj)
            if p.box is not None:
                raise PromptError(f"{row['_row']}: object {obj} already has a box on frame {row['t']} "
                                  f"({p.box_source}); give one box per object and frame")
            p.box = tuple(float(row[k]) for k in ("y0", "x0", "y1", "x1"))
            p.box_source = str(row["_row"])
    for t, obj, mask in mks:
        p = prompts._get(t, obj)
        if len(p.points) or p.box is not None:
            raise PromptError(f"object {obj} on frame {t} has both a mask (label image) and clicks or a box "
                              f"({p.source}); give one kind of prompt per object and frame")
        p.mask = mask
        p.mask_source = f"mask label {obj} (mask_frame={t})"
    if not prompts and (points is not None or boxes is not None or masks is not None):
        raise PromptError("the prompts given are empty (no click, no box, no label in the mask image); give at least "
                          "one, or no prompt at all to seed objects automatically")
    for p in prompts:
        if len(p.points) and not p.positive.any() and p.box is None and p.mask is None:
            raise PromptError(f"{p.source}: object {p.obj_id} on frame {p.t} has only negative clicks; "
                              "add a positive click or a box")
    return prompts
