"""GEFF, the graph exchange format of the tracking community: a result's tracks as a graph, labels beside.

``write_geff("movie.geff", labels, tracks)`` writes two zarr stores side by side:

``movie.geff``
    A GEFF (geff spec 1.x, zarr format 2), directed. One node per object and frame where the object
    has pixels (node ids ``0..N-1`` in ``label, t`` order), with the node properties ``t`` (frame),
    ``y``, ``x`` (centroid, pixels), ``area`` (pixels), ``label`` (the track id, the same on every
    frame), ``seg_id`` (the node's value in the labels: equal to ``label``) and ``score`` (SAM2's
    object-present logit; missing where it was not computed, left out when never computed). Edges:
    an object's consecutive nodes (links), and the mother's last node -> each daughter's first node
    (divisions). No edge properties: a division edge is one whose ends have different labels.
``movie.ome.zarr``
    The labels (OME-Zarr NGFF 0.4, (T, Y, X) uint32), named by the GEFF's ``related_objects`` (type
    ``labels``, path ``../movie.ome.zarr/0`` relative to the GEFF, ``node_prop`` ``seg_id``).

Positions stay in pixels and frames so that they index the labels; a physical scale goes into the
axes' ``scale`` / ``scaled_unit`` fields, as the spec provides. ``label`` is declared the tracklet id
(``track_node_props``) when it fits GEFF's definition: every mother has at least two daughters.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_path, prepare_destination
from .ctc import Track

__all__ = ["GEFF_SPEC", "GeffError", "GeffGraph", "labels_beside", "lineage_of", "open_labels", "read_geff",
           "write_geff"]

#: node property -> (dtype, unit, description)
NODE_PROPS = {
    "t": ("int64", "frame", "frame index"),
    "y": ("float64", "pixel", "centroid row"),
    "x": ("float64", "pixel", "centroid column"),
    "area": ("int64", None, "pixels of the object on the frame"),
    "label": ("int64", None, "track id: the object's label, the same on every frame"),
    "seg_id": ("int64", None, "the node's value in the related labels (equal to label)"),
    "score": ("float64", None, "SAM2 object-present logit (> 0: present); missing where not computed"),
}
_AXES = (("t", "time", "frame", "T"), ("y", "space", "pixel", "Y"), ("x", "space", "pixel", "X"))


def _spec() -> tuple[int, int]:
    import geff_spec

    major, minor = geff_spec.__version__.split(".")[:2]
    return int(major), int(minor)


GEFF_SPEC = "{}.{}".format(*_spec())


class GeffError(ValueError):
    """A GEFF that cannot be read as a result: the message names the file and what is wrong."""


def labels_beside(path: str | os.PathLike) -> Path:
    """The labels store of a GEFF: ``movie.geff`` -> ``movie.ome.zarr`` in the same folder."""
    path = Path(path)
    stem = path.name[:-5] if path.name.lower().endswith(".geff") else path.name
    return path.with_name(f"{stem}.ome.zarr")


def lineage_of(tracks: pd.DataFrame, where: str) -> list[Track]:
    """``(label, begin, end, parent)`` per label of a tracks table, its ``parent`` column checked.

    Unlike :func:`napari_sam2.tracking.ctc_tracks`, which drops parents that break the rules, a bad
    lineage here is an error naming ``where``: a label with two parents, a parent that is not a track,
    a parent that does not end before its daughter begins.
    """
    if len(tracks) == 0:
        return []
    spans = tracks.groupby("label")["t"].agg(["min", "max"]).sort_index()
    parents: dict[int, int] = {}
    if "parent" in tracks.columns:
        for label, values in tracks.groupby("label")["parent"].unique().items():
            values = [int(v) for v in values if int(v) != 0]
            if len(set(values)) > 1:
                raise ValueError(f"{where}: label {label} has more than one parent ({sorted(set(values))})")
            if values:
                parents[int(label)] = values[0]
    ends = {int(label): int(end) for label, end in spans["max"].items()}
    rows = []
    for label, (begin, end) in spans.iterrows():
        parent = parents.get(int(label), 0)
        if parent and parent not in ends:
            raise ValueError(f"{where}: the parent {parent} of label {label} is not a track (it has no node)")
        if parent and ends[parent] >= begin:
            raise ValueError(f"{where}: label {label} begins at frame {begin} but its parent {parent} ends at frame "
                             f"{ends[parent]}: a parent must end before its daughters begin")
        rows.append((int(label), int(begin), int(end), parent))
    return rows


# ------------------------------------------------------------------------------------ writing
def _nodes_and_edges(tracks: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, list[Track]]:
    """Nodes in ``label, t`` order (row i = node i), edges (E, 2), lineage; errors name the table."""
    missing = [c for c in ("t", "label", "y", "x", "area") if c not in tracks.columns]
    if missing:
        raise ValueError(f"the tracks table has no column {', '.join(missing)} (it has {', '.join(tracks.columns)})")
    nodes = tracks.sort_values(["label", "t"], kind="stable").reset_index(drop=True)
    twice = nodes[nodes.duplicated(["label", "t"])]
    if len(twice):
        raise ValueError(f"the tracks table lists label {twice['label'].iloc[0]} twice on frame {twice['t'].iloc[0]}")
    lineage = lineage_of(nodes, "the tracks table")
    label = nodes["label"].to_numpy()
    links = np.flatnonzero(label[1:] == label[:-1])
    ends = pd.Series(nodes.index, index=label).groupby(level=0).agg(["first", "last"])
    divisions = [(ends.at[p, "last"], ends.at[lab, "first"]) for lab, _, _, p in lineage if p]
    edges = np.array([*zip(links, links + 1), *divisions], dtype=np.uint64).reshape(-1, 2)
    return nodes, edges[np.lexsort((edges[:, 1], edges[:, 0]))], lineage


def _axes(scale, units: dict | None):
    from geff_spec import Axis

    units = dict(units or {})
    scale = None if scale is None else [float(s) for s in scale]
    if scale is None and units:
        scale = [1.0, 1.0, 1.0]  # the spec allows a scaled unit only with a scale
    return [Axis(name=name, type=kind, unit=unit,
                 scale=None if scale is None else scale[i],
                 scaled_unit=units.get(letter) if scale is not None else None)
            for i, (name, kind, unit, letter) in enumerate(_AXES)]


def _metadata(geff_path: Path, seg_array: Path, props: list[str], lineage: list[Track], scale, units, shape):
    from geff_spec import GeffMetadata, PropMetadata, RelatedObject

    from .. import __version__

    children: dict[int, int] = {}
    for _, _, _, parent in lineage:
        if parent:
            children[parent] = children.get(parent, 0) + 1
    rel = os.path.relpath(os.path.abspath(seg_array), os.path.abspath(geff_path))
    return GeffMetadata(
        directed=True, axes=_axes(scale, units),
        node_props_metadata={p: PropMetadata(identifier=p, dtype=NODE_PROPS[p][0], unit=NODE_PROPS[p][1],
                                             description=NODE_PROPS[p][2]) for p in props},
        edge_props_metadata={},
        track_node_props={"tracklet": "label"} if all(n >= 2 for n in children.values()) else None,
        related_objects=[RelatedObject(type="labels", path=rel.replace(os.sep, "/"), node_prop="seg_id")],
        extra={"napari_sam2": {"version": __version__, "shape": [int(s) for s in shape]}})


def _node_props(nodes: pd.DataFrame) -> dict[str, dict]:
    props = {name: {"values": nodes[name].to_numpy(dtype=NODE_PROPS[name][0]), "missing": None}
             for name in ("t", "y", "x", "area", "label")}
    props["seg_id"] = {"values": props["label"]["values"].copy(), "missing": None}
    if "score" in nodes.columns:
        score = nodes["score"].to_numpy(dtype=np.float64)
        absent = np.isnan(score)
        if not absent.all():
            props["score"] = {"values": score, "missing": absent if absent.any() else None}
    return props


def write_geff(path: str | os.PathLike, labels, tracks: pd.DataFrame | None = None, *, scores=None,
               labels_path: str | os.PathLike | None = None, scale=None, units: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write a result as a GEFF plus its labels as OME-Zarr beside it (see the module's docstring).

    Parameters
    ----------
    path : path-like
        The GEFF, ``NAME.geff``.
    labels : array (T, Y, X) or path-like
        The label video, written to ``labels_path``; or the path of an existing OME-Zarr labels
        store, then only named by the GEFF (never rewritten).
    tracks : pandas.DataFrame, optional
        A tracks table (:mod:`napari_sam2.tracking`: ``t, label, y, x, area``, optionally ``score``
        and ``parent``). Default: measured from ``labels``. The lineage is checked (:func:`lineage_of`).
    scores : dict of int to array (T,), optional
        Object-present logits per label, for tables without a ``score`` column.
    labels_path : path-like, optional
        Where to write the labels (default :func:`labels_beside` ``(path)``).
    scale, units
        Physical size of a (T, Y, X) step and units by axis letter (``{"Y": "micrometer"}``), for the
        GEFF axes and the OME-Zarr metadata. Positions are stored in pixels either way.
    overwrite : bool
        Replace an existing GEFF (and labels store).

    Both stores are written under temporary names; the labels appear first and the GEFF last, so a
    GEFF never names labels that are not there.
    """
    from geff.core_io import write_arrays

    from ..tracking import tracks_table
    from .writers import ZarrLabelsWriter

    path = Path(path).expanduser()
    if not path.name.lower().endswith(".geff"):
        raise ValueError(f"a GEFF is named NAME.geff, got '{path}'")
    existing = isinstance(labels, (str, os.PathLike))
    seg = Path(labels if existing else (labels_path or labels_beside(path))).expanduser()
    if existing:
        labels = open_labels(seg)
    if tracks is None or ("score" not in tracks.columns and scores):
        measured = tracks_table(labels, scores)
        tracks = measured if tracks is None else tracks.merge(measured[["t", "label", "score"]], on=["t", "label"],
                                                              how="left")
    nodes, edges, lineage = _nodes_and_edges(tracks)
    props = _node_props(nodes)
    # the array itself, not its group: readers such as traccuracy open the path as one zarr array
    array = seg / "0" if not existing or (seg / "0").exists() else seg
    metadata = _metadata(path, array, list(props), lineage, scale, units, labels.shape)
    prepare_destination(path, overwrite)  # before the labels: a GEFF that may not be written stops everything
    writer = None
    try:
        if not existing:
            writer = ZarrLabelsWriter(seg, tuple(labels.shape), overwrite=overwrite, units=units,
                                      scale=tuple(scale) if scale is not None else (1.0, 1.0, 1.0))
            for t in range(labels.shape[0]):
                writer.write(t, np.asarray(labels[t]))
        with atomic_path(path, overwrite=overwrite) as tmp:
            write_arrays(str(tmp), np.arange(len(nodes), dtype=np.uint64), props, edges, {}, metadata)
            if writer is not None:
                writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return path


# ------------------------------------------------------------------------------------ reading
@dataclass
class GeffGraph:
    """A GEFF read back (:func:`read_geff`).

    Attributes
    ----------
    nodes : pandas.DataFrame
        One row per node, indexed by node id: ``t``, ``label`` and those of ``y, x, area, seg_id,
        score`` the file has (``score`` NaN where missing).
    edges : numpy.ndarray, (E, 2) int64
        Source -> target node ids, sorted.
    lineage : list of (label, begin, end, parent)
        The CTC lineage the graph encodes (parents from the division edges).
    labels_path : pathlib.Path or None
        The labels the GEFF names (``related_objects`` of type ``labels``).
    scale : tuple of 3 floats or None; units : dict
        From the axes' ``scale`` / ``scaled_unit``.
    """

    path: Path
    nodes: pd.DataFrame
    edges: np.ndarray
    lineage: list[Track]
    labels_path: Path | None = None
    scale: tuple[float, float, float] | None = None
    units: dict = field(default_factory=dict)
    metadata: Any = None

    @property
    def parents(self) -> dict[int, int]:
        return {label: parent for label, _, _, parent in self.lineage if parent}


def _precheck(path: Path) -> None:
    """The spec version and the properties napari-sam2 needs, from the raw metadata."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as exc:  # noqa: BLE001 - any reason it is not a zarr group is reported the same way
        raise GeffError(f"'{path}' is not a GEFF: it cannot be opened as a zarr group ({exc})") from exc
    meta = attrs.get("geff")
    if not isinstance(meta, dict):
        raise GeffError(f"'{path}' is not a GEFF: its zarr attributes hold no 'geff' metadata")
    version = str(meta.get("geff_version", ""))
    found = re.match(r"(\d+)\.(\d+)", version)
    major, minor = _spec()
    if not found or int(found[1]) != major or int(found[2]) > minor:
        raise GeffError(f"'{path}' is a GEFF of spec version {version or '(none)'}; napari-sam2 reads spec "
                        f"{major}.0 to {GEFF_SPEC}. Convert it with the geff release of its version, or update geff.")
    # before geff's own validation, whose messages about a missing axis property do not say what is needed
    props = meta.get("node_props_metadata") if isinstance(meta.get("node_props_metadata"), dict) else {}
    tracklet = (meta.get("track_node_props") or {}).get("tracklet") if isinstance(meta.get("track_node_props"), dict) \
        else None
    for name in ("t", "label" if "label" in props or not tracklet else tracklet):
        if name not in props:
            raise GeffError(f"'{path}': the nodes have no property '{name}' (they have: "
                            f"{', '.join(sorted(props)) or 'none'}); napari-sam2 needs 't' (frame) and "
                            "'label' (track id) on every node")


def _prop(props: dict, name: str, path: Path, dtype) -> np.ndarray:
    missing = props[name].get("missing")
    if missing is not None and np.any(missing):
        raise GeffError(f"'{path}': node property '{name}' is missing on {int(np.sum(missing))} nodes; "
                        "every node needs it")
    values = np.asarray(props[name]["values"])
    if np.dtype(dtype).kind == "i" and values.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise GeffError(f"'{path}': node property '{name}' holds non-integer values; it must be whole numbers")
    return values.astype(dtype)


def _labels_path(meta, path: Path) -> Path | None:
    for obj in meta.related_objects or ():
        if obj.type == "labels":
            return Path(os.path.normpath(path / obj.path))
    return None


def read_geff(path: str | os.PathLike) -> GeffGraph:
    """Read a GEFF written by :func:`write_geff` (or any directed GEFF with ``t`` and ``label``).

    ``label`` may instead be the tracklet property the metadata names (``track_node_props``).

    Raises
    ------
    FileNotFoundError
        No such file.
    GeffError
        Not a GEFF, a GEFF of another spec version, an invalid or undirected one, a node property
        ``t`` or ``label`` missing, a label twice on one frame, an edge that does not run forward in
        time, a label with two parents, or a parent that does not end before its daughter begins.
    """
    import pydantic
    from geff.core_io import read_to_memory

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GEFF '{path}' does not exist")
    _precheck(path)
    try:
        memory = read_to_memory(str(path))
    except (ValueError, TypeError, KeyError, pydantic.ValidationError) as exc:
        raise GeffError(f"'{path}' is not a valid GEFF: {exc}") from exc
    meta, props = memory["metadata"], memory["node_props"]
    if not meta.directed:
        raise GeffError(f"'{path}' is an undirected graph; a tracking result's edges run forward in time")
    label_prop = "label" if "label" in props else (meta.track_node_props or {}).get("tracklet", "label")
    ids = np.asarray(memory["node_ids"]).astype(np.int64)
    nodes = pd.DataFrame({"t": _prop(props, "t", path, np.int64), "label": _prop(props, label_prop, path, np.int64)},
                         index=pd.Index(ids, name="node"))
    for name in ("y", "x", "area", "seg_id", "score"):
        if name in props and name not in nodes.columns:
            values = np.asarray(props[name]["values"], dtype=NODE_PROPS[name][0])
            if name == "score" and props[name].get("missing") is not None:
                values = np.where(props[name]["missing"], np.nan, values)
            nodes[name] = values
    edges = np.asarray(memory["edge_ids"]).astype(np.int64).reshape(-1, 2)
    return GeffGraph(path, nodes, edges, _lineage(nodes, edges, path), _labels_path(meta, path),
                     *_scale(meta), metadata=meta)


def _lineage(nodes: pd.DataFrame, edges: np.ndarray, path: Path) -> list[Track]:
    twice = nodes[nodes.duplicated(["label", "t"])]
    if len(twice):
        raise GeffError(f"'{path}': label {twice['label'].iloc[0]} has two nodes on frame {twice['t'].iloc[0]}")
    at = nodes.index.get_indexer(edges.ravel()).reshape(-1, 2)
    if (at < 0).any():
        raise GeffError(f"'{path}': an edge names node {edges[at < 0][0]}, which is not a node of the graph")
    t, label = nodes["t"].to_numpy()[at], nodes["label"].to_numpy()[at]
    backward = np.flatnonzero(t[:, 0] >= t[:, 1])
    if backward.size:
        (u, v), (tu, tv), (lu, lv) = edges[backward[0]], t[backward[0]], label[backward[0]]
        raise GeffError(f"'{path}': edge {u} -> {v} runs from frame {tu} (label {lu}) to frame {tv} (label {lv}); "
                        "edges must run forward in time, a parent before its daughter")
    parents: dict[int, int] = {}
    for mother, daughter in label[label[:, 0] != label[:, 1]].tolist():  # the division edges
        if parents.setdefault(daughter, mother) != mother:
            raise GeffError(f"'{path}': label {daughter} has two parents, {parents[daughter]} and {mother}")
    table = nodes.assign(parent=[parents.get(int(lab), 0) for lab in nodes["label"]])
    try:
        return lineage_of(table, f"'{path}'")
    except ValueError as exc:
        raise GeffError(str(exc)) from exc


def _scale(meta) -> tuple[tuple[float, float, float] | None, dict]:
    axes = {ax.name: ax for ax in meta.axes or ()}
    if not any(axes.get(n) is not None and axes[n].scale is not None for n, *_ in _AXES):
        return None, {}
    scale = tuple(float(axes[n].scale) if n in axes and axes[n].scale is not None else 1.0 for n, *_ in _AXES)
    units = {letter: axes[n].scaled_unit for n, _, _, letter in _AXES if n in axes and axes[n].scaled_unit}
    return scale, units


def open_labels(path: str | os.PathLike):
    """The (T, Y, X) labels of an OME-Zarr store (or of its array ``0``), lazily, as a dask array."""
    from .readers import open_stack

    path = Path(path)
    if path.name == "0" and ((path.parent / ".zattrs").exists() or (path.parent / "zarr.json").exists()):
        path = path.parent  # the array of an OME-Zarr group: open the group, for its axes
    stack = open_stack(path)
    if stack.axes != "TYX":
        raise GeffError(f"the labels '{path}' have axes {stack.axes}; a result's labels are (T, Y, X)")
    return stack.data
