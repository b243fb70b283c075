"""``napari-sam2 convert RESULT OUT``: a result between its three forms, the kind of OUT read from its name.

``ctc``
    A Cell Tracking Challenge folder: ``mask000.tif``... + ``res_track.txt`` (or a ground-truth
    ``TRA`` folder: ``man_track000.tif``... + ``man_track.txt``). OUT: any other name (``NAME_RES``).
``geff``
    ``NAME.geff`` and the labels it names, ``NAME.ome.zarr`` beside it (:mod:`napari_sam2.io.geff_io`).
``zarr``
    OME-Zarr labels ``NAME.ome.zarr`` (or ``NAME.zarr``) and the tracks table ``NAME.tracks.csv`` beside
    it, as ``segment`` writes them; without the CSV the labels alone (no scores, no lineage).

The labels are the truth: node geometry (centroid, area) is measured from them again, and the
source's other information (object-present scores, the lineage) must agree with them — a label the
masks do not hold, spans that differ, a parent that does not end before its daughter begins are
errors naming the file and the label. Outputs never replace an input; an existing OUT is replaced
only with ``overwrite`` and only when it is a result of that kind (or an empty folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ConvertError", "convert", "input_kind", "output_kind", "read_result"]

_FILE_SUFFIXES = (".tif", ".tiff", ".csv", ".txt", ".json", ".png", ".npy")


class ConvertError(ValueError):
    """A result that cannot be converted, or an OUT that may not be written; the message names the file."""


@dataclass
class Result:
    """A result read for conversion: labels (lazy), the tracks table measured from them (``score`` and
    ``parent`` from the source), the files read, and the scale when the source knows it."""

    kind: str
    labels: Any
    tracks: pd.DataFrame
    files: list[Path]
    scale: tuple | None = None
    units: dict = field(default_factory=dict)
    lineage: bool = True  # whether the source holds one (a labels store alone does not)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".geff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _csv_beside(store: Path) -> Path:
    return store.with_name(f"{_stem(store)}.tracks.csv")


def output_kind(out: str | os.PathLike) -> str:
    """``.geff`` -> geff, ``.zarr`` / ``.ome.zarr`` -> zarr, a folder name (e.g. ``NAME_RES``) -> ctc."""
    name = Path(out).name.lower()
    if name.endswith(".geff"):
        return "geff"
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(_FILE_SUFFIXES):
        raise ConvertError(f"cannot tell the format of OUT '{out}': name it NAME.geff (GEFF + OME-Zarr labels), "
                           "NAME.ome.zarr (OME-Zarr labels + NAME.tracks.csv) or a folder (CTC, e.g. NAME_RES)")
    return "ctc"


def input_kind(path: str | os.PathLike) -> str:
    from .io.ctc import numbered_files

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the result '{path}' does not exist")
    name = path.name.lower()
    if name.endswith(".geff"):
        return "geff"
    if name.endswith(".zarr"):
        return "zarr"
    if any((path / f).is_file() for f in ("res_track.txt", "man_track.txt")) or numbered_files(path, "mask"):
        return "ctc"
    raise ConvertError(f"'{path}' is not a result: expected a CTC folder (mask000.tif..., res_track.txt), a GEFF "
                       "(NAME.geff) or OME-Zarr labels (NAME.ome.zarr, with NAME.tracks.csv beside it)")


# ------------------------------------------------------------------------------------ reading
class _TiffFrames:
    """A folder's numbered TIFFs as a lazy (T, Y, X) array: one frame read at a time."""

    def __init__(self, files: list[Path]):
        import tifffile

        self.files = files
        first = tifffile.imread(files[0])
        if first.ndim != 2:
            raise ConvertError(f"'{files[0]}' has shape {first.shape}: only 2D (Y, X) masks are supported")
        self.shape, self.dtype, self.ndim = (len(files), *first.shape), first.dtype, 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, t: int) -> np.ndarray:
        import tifffile

        frame = tifffile.imread(self.files[t])
        if frame.shape != self.shape[1:]:
            raise ConvertError(f"'{self.files[t]}' has shape {frame.shape} but '{self.files[0].name}' has "
                               f"{self.shape[1:]}: every mask must have the same size")
        return frame


def _agree(claimed: list, measured: pd.DataFrame, where: str, per_node: pd.DataFrame | None = None) -> None:
    """The source's tracks agree with the labels: the same labels over the same frames (and, for
    per-node sources, the same nodes)."""
    spans = measured.groupby("label")["t"].agg(["min", "max"])
    said = {label: (b, e) for label, b, e, _ in claimed}
    seen = {int(label): (int(r["min"]), int(r["max"])) for label, r in spans.iterrows()}
    for label in sorted(set(said) | set(seen)):
        if label not in seen:
            raise ConvertError(f"{where}: label {label} is listed but has no pixels in the labels")
        if label not in said:
            raise ConvertError(f"{where}: label {label} is in the labels (frames {seen[label][0]}..{seen[label][1]}) "
                               "but not listed")
        if said[label] != seen[label]:
            raise ConvertError(f"{where}: label {label} is listed on frames {said[label][0]}..{said[label][1]} but "
                               f"the labels hold it on frames {seen[label][0]}..{seen[label][1]}")
    if per_node is not None:
        listed = set(zip(per_node["label"].tolist(), per_node["t"].tolist()))
        drawn = set(zip(measured["label"].tolist(), measured["t"].tolist()))
        for label, t in sorted(listed ^ drawn):
            what = "has no pixels on" if (label, t) in listed else "has pixels but no entry on"
            raise ConvertError(f"{where}: label {label} {what} frame {t}")


def _measured(labels, source: pd.DataFrame | None, lineage: list) -> pd.DataFrame:
    """The tracks table of ``labels`` with the source's scores and the lineage's parents."""
    from .tracking import add_parents, tracks_table

    table = tracks_table(labels)
    if source is not None and "score" in source.columns:
        columns = list(table.columns)
        table = table.drop(columns="score").merge(source[["t", "label", "score"]], on=["t", "label"], how="left")
        table = table[columns]
    return add_parents(table, {label: p for label, _, _, p in lineage if p})


def _read_ctc(folder: Path) -> Result:
    from .io.ctc import numbered_files, read_ctc_tracks
    from .io.geff_io import lineage_of

    for prefix, name in (("mask", "res_track.txt"), ("man_track", "man_track.txt")):
        files, track_file = numbered_files(folder, prefix), folder / name
        if files:
            break
    if not files:
        raise ConvertError(f"'{folder}' holds no masks (mask000.tif...): it is not a CTC result folder")
    absent = sorted(set(range(max(files) + 1)) - set(files))
    if absent:
        raise ConvertError(f"'{folder}': frame {absent[0]} has no mask ({prefix}{absent[0]:03d}.tif); frames "
                           f"0..{max(files)} must all be there")
    if not track_file.is_file():
        raise ConvertError(f"'{folder}' has masks but no {track_file.name}: the lineage (L B E P per track) is missing")
    labels = _TiffFrames([files[t] for t in range(max(files) + 1)])
    rows = read_ctc_tracks(track_file)
    twice = sorted({r[0] for r in rows if [q[0] for q in rows].count(r[0]) > 1})
    if twice:
        raise ConvertError(f"'{track_file}': label {twice[0]} is listed twice")
    ends = pd.DataFrame([(lab, t, p) for lab, b, e, p in rows for t in (b, e)], columns=["label", "t", "parent"])
    where = f"'{track_file}'"
    try:
        lineage = lineage_of(ends, where)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    table = _measured(labels, None, lineage)
    _agree(lineage, table, where)
    return Result("ctc", labels, table, [folder])


def _read_zarr(store: Path) -> Result:
    from .io import StackReadError, open_stack
    from .io.geff_io import lineage_of

    try:
        stack = open_stack(store)
    except StackReadError as exc:
        raise ConvertError(str(exc)) from exc
    if stack.axes != "TYX":
        raise ConvertError(f"the labels '{store}' have axes {stack.axes}; a result's labels are (T, Y, X)")
    meta = stack.metadata
    sizes = meta.get("physical_pixel_sizes", {})
    scale = (float(meta.get("time_interval", 1.0)), float(sizes.get("Y", 1.0)), float(sizes.get("X", 1.0)))
    units = dict(meta.get("units") or {})
    scale = None if scale == (1.0, 1.0, 1.0) and not units else scale
    csv = _csv_beside(store)
    if not csv.is_file():
        return Result("zarr", stack.data, _measured(stack.data, None, []), [store], scale, units, lineage=False)
    try:
        source = pd.read_csv(csv)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"'{csv}' cannot be read as a tracks table: {exc}") from exc
    missing = [c for c in ("t", "label") if c not in source.columns]
    if missing:
        raise ConvertError(f"'{csv}' has no column {', '.join(missing)} (it has {', '.join(source.columns)})")
    where = f"'{csv}'"
    try:
        lineage = lineage_of(source, where)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    table = _measured(stack.data, source, lineage)
    _agree(lineage, table, where, per_node=source)
    return Result("zarr", stack.data, table, [store, csv], scale, units, lineage="parent" in source.columns)


def _read_geff(path: Path) -> Result:
    from .io import StackReadError
    from .io.geff_io import labels_beside, open_labels, read_geff

    graph = read_geff(path)
    seg = graph.labels_path or labels_beside(path)
    if not seg.exists():
        raise ConvertError(f"'{path}': its labels '{seg}' do not exist" if graph.labels_path else
                           f"'{path}' names no labels (no related object of type 'labels') and '{seg}' does not exist")
    try:
        labels = open_labels(seg)
    except (StackReadError, ValueError) as exc:
        raise ConvertError(f"'{path}': its labels cannot be read: {exc}") from exc
    nodes = graph.nodes
    if "seg_id" in nodes.columns and (nodes["seg_id"] != nodes["label"]).any():
        raise ConvertError(f"'{path}': seg_id differs from label on some nodes; only GEFFs whose labels hold the "
                           "track ids (seg_id == label) can be converted")
    where = f"'{path}'"
    table = _measured(labels, nodes, graph.lineage)
    _agree(graph.lineage, table, where, per_node=nodes)
    store = seg.parent if seg.name == "0" else seg
    return Result("geff", labels, table, [path, store], graph.scale, graph.units)


def read_result(path: str | os.PathLike) -> Result:
    """Read a result of any kind (:func:`input_kind`) for conversion; errors name the file."""
    from .io.geff_io import GeffError

    path = Path(path).expanduser()
    kind = input_kind(path)
    try:
        return {"ctc": _read_ctc, "zarr": _read_zarr, "geff": _read_geff}[kind](path)
    except GeffError as exc:
        raise ConvertError(str(exc)) from exc


# ------------------------------------------------------------------------------------ writing
def _outputs(out: Path, kind: str) -> list[Path]:
    from .io.geff_io import labels_beside

    return {"ctc": [out], "zarr": [out, _csv_beside(out)], "geff": [out, labels_beside(out)]}[kind]


def _looks_like(path: Path, kind: str) -> bool:
    """Whether an existing ``path`` is an earlier output of this kind (what ``overwrite`` may replace)."""
    if path.suffix == ".csv":
        return path.is_file()
    if not path.is_dir() or path.is_symlink():
        return False
    names = [p.name for p in path.iterdir()]
    if kind == "ctc":
        return all(n == "res_track.txt" or (n.startswith("mask") and n.endswith((".tif", ".tiff"))) for n in names)
    return any(n in names for n in (".zgroup", ".zattrs", "zarr.json"))


def _check_outputs(outputs: list[Path], kind: str, inputs: list[Path], overwrite: bool) -> bool:
    """Refuse outputs that are or hold an input, or that exist (without ``overwrite``, or not a result of
    that kind); returns whether an existing output is replaced."""
    for out in outputs:
        dst = Path(os.path.realpath(out))
        for source in inputs:
            src = Path(os.path.realpath(source))
            if dst == src or src in dst.parents or dst in src.parents:
                raise ConvertError(f"the output '{out}' would overwrite the input '{source}': choose another OUT")
    replace = False
    for out in outputs:
        if not (out.exists() or out.is_symlink()):
            continue
        if kind == "ctc" and out.is_dir() and not any(out.iterdir()):
            replace = True  # an empty folder made for the result: nothing is lost
            continue
        if not overwrite:
            raise ConvertError(f"'{out}' already exists: pass --overwrite to replace it, or choose another OUT")
        if not _looks_like(out, "ctc" if kind == "ctc" else "zarr"):
            raise ConvertError(f"'{out}' exists and is not an earlier result of this kind: --overwrite does not "
                               "replace it. Move it away or choose another OUT")
        replace = True
    return replace


def _write(result: Result, out: Path, kind: str, overwrite: bool) -> None:
    from .io import ZarrLabelsWriter, write_ctc, write_tracks_csv
    from .io.geff_io import lineage_of, write_geff

    if kind == "geff":
        write_geff(out, result.labels, result.tracks, scale=result.scale, units=result.units, overwrite=overwrite)
        return
    lineage = lineage_of(result.tracks, "the tracks")
    if kind == "ctc":
        write_ctc(out, result.labels, tracks=lineage, overwrite=overwrite)
        return
    scale = tuple(result.scale) if result.scale is not None else (1.0, 1.0, 1.0)
    tracks = result.tracks if result.lineage else result.tracks.drop(columns="parent")
    with ZarrLabelsWriter(out, tuple(result.labels.shape), overwrite=overwrite, scale=scale,
                          units=result.units or None) as writer:
        for t in range(result.labels.shape[0]):
            writer.write(t, np.asarray(result.labels[t]))
    write_tracks_csv(_csv_beside(out), tracks, overwrite=overwrite)  # last: a CSV means its labels are there


def convert(result: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Convert the result at ``result`` into the kind OUT's name asks for (:func:`output_kind`).

    Returns ``{"from", "to", "written", "frames", "objects", "divisions"}``.

    Raises
    ------
    FileNotFoundError
        No result at ``result``.
    ConvertError
        A result that cannot be read or disagrees with its labels, an OUT whose kind is unclear, that
        would overwrite an input, or that exists (see ``overwrite``).
    napari_sam2.io.OutputWriteError
        The outputs cannot be written.
    """
    out = Path(out).expanduser()
    kind = output_kind(out)
    source = read_result(result)
    replace = _check_outputs(_outputs(out, kind), kind, source.files, overwrite)
    try:
        _write(source, out, kind, replace)
    except ValueError as exc:  # e.g. labels above 65535 for the 16-bit CTC masks
        raise ConvertError(f"cannot write '{out}': {exc}") from exc
    parents = source.tracks.groupby("label")["parent"].first()
    return {"from": source.kind, "to": kind, "written": [str(p) for p in _outputs(out, kind)],
            "frames": int(source.labels.shape[0]), "objects": int(source.tracks["label"].nunique()),
            "divisions": int(parents[parents > 0].nunique())}
