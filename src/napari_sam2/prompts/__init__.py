"""Prompts for a time-lapse: clicks, boxes and masks, from napari layers, tables or files.

Coordinates follow napari: ``(t, y, x)`` with ``t`` the frame index and ``y, x`` pixel indices
(row, column); they are turned into the SAM2 predictor's ``(x, y)`` only when applied.

One module per job, each importing only the ones before it (no cycles):

- :mod:`.model`: :class:`Prompt` (one object on one frame), :class:`Prompts` (a whole stack:
  check against it, apply to a video predictor), :class:`PromptError`, :func:`clip_points`, :func:`clip_box`.
- :mod:`.tables`: :func:`build_prompts` and the parsing of arrays, DataFrames and dicts
  (:func:`points_table`, :func:`boxes_table`, :func:`mask_prompts`); its doc lists the accepted
  forms.
- :mod:`.files`: :func:`read_prompts_file` (CSV, JSON, label TIFF) and
  :data:`PROMPT_FILE_SUFFIXES`.

The names below are the ones the rest of the package, its tests and its users import from
``napari_sam2.prompts``.
"""

from .files import PROMPT_FILE_SUFFIXES, read_prompts_file
from .model import Prompt, PromptError, Prompts, clip_box, clip_points
from .tables import boxes_table, build_prompts, mask_prompts, points_table

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
    "clip_box",
    "clip_points",
]
