"""Reading prompts files: CSV and JSON tables of clicks and boxes, label TIFF images of masks.

:func:`read_prompts_file` reads one file into the points and boxes tables of :mod:`.tables` (and a
mask label image), each row named after its line or item in the file so that errors point there;
:data:`PROMPT_FILE_SUFFIXES` are the file types it reads (the batch CLI uses them to find prompts
files beside the stacks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .model import PromptError
from .tables import boxes_table, find_column, points_table, require_columns

__all__ = ["read_prompts_file", "PROMPT_FILE_SUFFIXES"]

PROMPT_FILE_SUFFIXES = (".csv", ".json", ".tif", ".tiff")


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
    has_points = find_column(df, "y") is not None or find_column(df, "x") is not None
    has_boxes = any(c in df.columns for c in ("y0", "x0", "y1", "x1"))
    if not has_points and not has_boxes:
        require_columns(df, ("t", "y", "x"), "points", source)  # raises, naming what is missing
    if len(df) == 0:
        raise PromptError(f"prompts file {source} holds no prompt (it has no rows): add clicks or boxes to it, "
                          "or use --auto instead of --prompts to seed objects automatically")
    point_rows = df
    box_rows = df.iloc[0:0]
    if has_boxes:
        box_cols = [c for c in ("y0", "x0", "y1", "x1") if c in df.columns]
        is_box = df[box_cols].notna().any(axis=1)
        if has_points:
            pcols = [c for c in (find_column(df, "y"), find_column(df, "x")) if c is not None]
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
