"""Parsing prompts: napari arrays, DataFrames and dicts -> prompt rows -> :class:`~.model.Prompts`.

:func:`points_table` and :func:`boxes_table` turn every accepted form into one normalised table
each, :func:`mask_prompts` splits a label image into one mask per object, and
:func:`build_prompts` collects them into :class:`~.model.Prompts`, numbering objects that have no
id. Reading files is :mod:`.files`' job; it builds on the tables here.

Coordinates follow napari: ``(t, y, x)`` with ``t`` the frame index and ``y, x`` pixel indices
(row, column). :class:`~.model.Prompts` converts them to the ``(x, y)`` order of the SAM2 video
predictor when it applies them, so that nobody has to.

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

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from .model import PromptError, Prompts

__all__ = [
    "build_prompts",
    "points_table",
    "boxes_table",
    "mask_prompts",
    "find_column",
    "require_columns",
]

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


def find_column(df: pd.DataFrame, name: str) -> str | None:
    """The column of ``df`` that holds ``name`` under any of its accepted aliases.

    Parameters
    ----------
    df : pandas.DataFrame
        A table with lower-case column names.
    name : str
        One of ``t, y, x, obj_id, positive, y0, x0, y1, x1``; e.g. ``"t"`` is also found as
        ``frame``, ``axis-0`` or ``time``.

    Returns
    -------
    str or None
        The column's name in ``df``, None if ``df`` has no such column.
    """
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


def require_columns(df: pd.DataFrame, names: Iterable[str], what: str, source: str | None) -> None:
    """Raise :class:`~.model.PromptError` if ``df`` lacks any of ``names`` (aliases count).

    Parameters
    ----------
    df : pandas.DataFrame
        A table with lower-case column names.
    names : iterable of str
        The columns needed, as for :func:`find_column`.
    what : str
        ``"points"`` or ``"boxes"``: names the table in the message and says which columns it needs.
    source : str or None
        Where the table came from (e.g. a file name), for the message.
    """
    missing = [n for n in names if find_column(df, n) is None]
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
    require_columns(df, ("t", "y", "x"), what, source)
    rows = _row_names(df, what)
    n = len(df)
    t = _integers(_numeric(df, find_column(df, "t"), rows, what, "frame"), rows, "the frame t")
    y = _numeric(df, find_column(df, "y"), rows, what, "y")
    x = _numeric(df, find_column(df, "x"), rows, what, "x")
    ids = np.full(n, -1, dtype=np.int64)
    id_col = find_column(df, "obj_id")
    if id_col is not None:
        ids = _ids(df[id_col].to_numpy(), rows)
    if obj_ids is not None:
        ids = _ids(_per_point(obj_ids, n, "obj_ids", "object id"), rows)
    pos = np.ones(n, dtype=bool)
    pos_col = find_column(df, "positive")
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
    require_columns(df, ("t", "y0", "x0", "y1", "x1"), what, source)
    rows = _row_names(df, what)
    n = len(df)
    t = _integers(_numeric(df, find_column(df, "t"), rows, what, "frame"), rows, "the frame t")
    coords = {k: _numeric(df, find_column(df, k), rows, what, k) for k in ("y0", "x0", "y1", "x1")}
    for i in range(n):
        if coords["y1"][i] < coords["y0"][i] or coords["x1"][i] < coords["x0"][i]:
            raise PromptError(
                f"{rows[i]}: box (y0, x0, y1, x1) = ({coords['y0'][i]:g}, {coords['x0'][i]:g}, "
                f"{coords['y1'][i]:g}, {coords['x1'][i]:g}) has y1 < y0 or x1 < x0"
            )
    ids = np.full(n, -1, dtype=np.int64)
    id_col = find_column(df, "obj_id")
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


def build_prompts(points: Any = None, boxes: Any = None, masks: Any = None, *, obj_ids: Any = None,
                  positive: Any = None, box_ids: Any = None, mask_frame: int = 0) -> Prompts:
    """Collect points, boxes and a mask label image into :class:`~.model.Prompts` (see :mod:`.tables`).

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
            p = prompts.get_or_add(row["t"], obj)
            p.points = np.vstack([p.points, [[row["y"], row["x"]]]])
            p.positive = np.append(p.positive, bool(row["positive"]))
            p.point_sources.append(str(row["_row"]))
    if bxs is not None:
        for row in bxs.to_dict("records"):
            obj = int(row["obj_id"])
            if obj < 0:
                obj, next_id = next_id, next_id + 1
            p = prompts.get_or_add(row["t"], obj)
            if p.box is not None:
                raise PromptError(f"{row['_row']}: object {obj} already has a box on frame {row['t']} "
                                  f"({p.box_source}); give one box per object and frame")
            p.box = tuple(float(row[k]) for k in ("y0", "x0", "y1", "x1"))
            p.box_source = str(row["_row"])
    for t, obj, mask in mks:
        p = prompts.get_or_add(t, obj)
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
