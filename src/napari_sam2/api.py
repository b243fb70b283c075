"""Notebook API: segment and track objects through a time-lapse in one call.

>>> from napari_sam2 import segment_stack
>>> result = segment_stack("movie.tif", points=[[0, 120, 80], [0, 40, 200]])   # doctest: +SKIP
>>> result.labels.shape, result.tracks.head()                                   # doctest: +SKIP

Labels are made and written frame by frame as the video predictor yields them: with ``out`` a path,
nothing holds the whole video in memory.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import Stack, ZarrLabelsWriter, open_stack, video_view
from .labels import LABEL_DTYPE, logits_to_labels, open_label_sink
from .lineage import LOST_AFTER
from .modeling.configs import DEFAULT_MODEL
from .predictor.generator_parameters import generator_parameters
from .prompts import Prompts, build_prompts
from .propagation import DIRECTIONS, VideoPredictorLike, needs_history, plan_passes, run_passes
from .tracking import PARENT_COLUMN, TrackTable, add_parents, ctc_tracks

__all__ = ["segment_stack", "SegmentationResult", "open_video"]


@dataclass
class SegmentationResult:
    """What :func:`segment_stack` returns.

    Attributes
    ----------
    labels : numpy.ndarray or zarr.Array, (T, Y, X) uint32
        One label id per object, stable over time (0 = background). A read-only zarr array of
        the OME-Zarr store when ``out`` was a path.
    scores : dict of int to numpy.ndarray (T,)
        Per object, SAM2's object-present logit on every frame (> 0: present, <= 0: occluded or
        gone; NaN on frames that were not tracked).
    tracks : pandas.DataFrame
        One row per object and frame where it has pixels (see :mod:`napari_sam2.tracking`):
        ``t, label, y, x, area, bbox_y0, bbox_x0, bbox_y1, bbox_x1, score``, plus ``parent`` (the
        mother's label, 0 for none) when ``detect_new`` or ``detect_divisions`` was used.
    obj_ids : list of int
        The objects tracked (prompted, seeded by the automatic mask generator, found entering or
        born by division).
    parents : dict of int to int
        Daughter label -> mother label, for every division found (empty without ``detect_divisions``).
    path : pathlib.Path or None
        The OME-Zarr store, when ``out`` was a path.
    seconds : float
        Wall time of the call.
    """

    labels: Any
    scores: dict[int, np.ndarray]
    tracks: pd.DataFrame
    obj_ids: list[int]
    path: Path | None = None
    seconds: float = 0.0
    parents: dict[int, int] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_objects(self) -> int:
        return len(self.obj_ids)

    def scores_table(self) -> pd.DataFrame:
        """The scores as a table: one row per frame, one column per object id."""
        return pd.DataFrame({obj: s for obj, s in self.scores.items()}, index=pd.RangeIndex(self.n_frames, name="t"))

    def to_tiff(self, path: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
        """Write the labels as a compressed ImageJ TIFF (streamed frame by frame)."""
        from .io import write_tiff_labels

        return write_tiff_labels(path, self.labels, overwrite=overwrite, **kwargs)

    def to_ctc(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a Cell Tracking Challenge result folder (``mask000.tif``..., ``res_track.txt``)."""
        from .io import write_ctc

        return write_ctc(path, self.labels, tracks=ctc_tracks(self.tracks), overwrite=overwrite)

    def to_geff(self, path: str | os.PathLike, overwrite: bool = False, scale=None, units: dict | None = None) -> Path:
        """Write the tracks as a GEFF graph ``NAME.geff`` and the labels as ``NAME.ome.zarr`` beside it.

        Nodes: one per object and frame (``t, y, x, area, label, seg_id, score``); edges: links and
        divisions (see :mod:`napari_sam2.io.geff_io`). The lineage is the one :meth:`to_ctc` writes.
        ``scale``/``units``: physical size of a (T, Y, X) step, recorded in the GEFF axes and the labels.
        Labels already in that store (``out`` of :func:`segment_stack`) are referenced, not rewritten.
        """
        from .io.geff_io import labels_beside, write_geff

        tracks = self.tracks
        if PARENT_COLUMN in tracks.columns:  # the same lineage as res_track.txt: parents that break the rules dropped
            tracks = add_parents(tracks, {label: p for label, _, _, p in ctc_tracks(tracks) if p})
        beside = labels_beside(path)
        labels = self.path if self.path is not None and _same_file(self.path, beside) else self.labels
        return write_geff(path, labels, tracks, scale=scale, units=units, overwrite=overwrite)

    def to_csv(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the tracks table as CSV."""
        from .io import write_tracks_csv

        return write_tracks_csv(path, self.tracks, overwrite=overwrite)

    def __repr__(self) -> str:
        where = f", path='{self.path}'" if self.path else ""
        return (f"SegmentationResult(labels {tuple(self.labels.shape)} {self.labels.dtype}, "
                f"{self.n_objects} objects, {len(self.tracks)} track rows{where}, {self.seconds:.1f} s)")


# ------------------------------------------------------------------------------------ helpers
def _same_file(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def open_video(stack: Any, axes: str | None = None, channel: int | None = None,
               **planes) -> tuple[Stack, tuple[int, int, int]]:
    """Open any source as the video to segment: a ``TYX`` stack (``TYXC`` for RGB) and ``(T, Y, X)``.

    ``planes``: ``z``, ``z_project``, ``along``, ``t`` of :func:`napari_sam2.io.select`, for stacks
    with a Z axis. Raises the readers' errors (``FileNotFoundError``, ``StackReadError``, ``ValueError``
    for axes that do not fit or a channel out of range) before anything heavy happens.
    """
    video = video_view(open_stack(stack, axes=axes), channel=channel,
                       **{k: v for k, v in planes.items() if v is not None})
    t = video.size("T")
    shape = (int(t), video.size("Y"), video.size("X"))
    if shape[0] == 0:
        raise ValueError("the stack has 0 frames: nothing to segment")
    return video, shape


def _seed_automatically(predictor: VideoPredictorLike, state, video: Stack, frame: int, auto: dict | None, rgb: bool) -> list[int]:
    """Seed objects on ``frame`` with the automatic mask generator; returns their ids (1..N)."""
    from .predictor.seeding import FrameSeeder

    masks = FrameSeeder(predictor.model, auto, state.intensity_range, rgb=rgb)(video.data[frame])
    for obj_id, mask in enumerate(masks, start=1):
        predictor.add_new_mask(state, frame_idx=frame, obj_id=obj_id, mask=mask)
    return list(range(1, len(masks) + 1))


def _progress_bar(progress, total: int, desc: str):
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else desc
    return tqdm(total=total, desc=label, unit="frame", disable=not progress, leave=True)


# ------------------------------------------------------------------------------------ the call
def embed_stack(
    stack,
    *,
    model: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    image_size: int | None = None,
    precision: str = "auto",
    feature_cache=None,
    axes: str | None = None,
    channel: int | None = None,
    z: int | None = None,
    z_project: str | None = None,
    along: str | None = None,
    t: int | None = None,
    frames=None,
    predictor: VideoPredictorLike | None = None,
    progress: bool | str = True,
) -> dict:
    """Encode every frame of ``stack`` (or ``frames``) into the feature cache ahead of time.

    Later clicks, propagation passes and :func:`segment_stack` runs on the same stack with the same
    model, size, precision and planes then only run the decoder and the memory. Arguments as in
    :func:`segment_stack`. Returns ``{"frames", "encoded", "cached", "location"}``: frames looked at,
    frames encoded now, frames found cached already, and the cache folder (None: in memory).
    """
    video, shape = open_video(stack, axes=axes, channel=channel, z=z, z_project=z_project, along=along, t=t)
    if predictor is None:
        from .predictor.video import build_video_predictor

        predictor = build_video_predictor(model, checkpoint=checkpoint, device=device, image_size=image_size,
                                          precision=precision, feature_cache=feature_cache)
    cache = predictor.feature_cache
    if cache is None:
        raise ValueError("the feature cache is off (feature_cache=False or $NAPARI_SAM2_FEATURES=off): there is "
                         "nowhere to keep precomputed features. Pass feature_cache=None or a folder.")
    state = predictor.init_state(video, history="ram")
    todo = list(range(shape[0])) if frames is None else [int(f) for f in frames]
    bar = _progress_bar(progress, len(todo), "encoding")
    try:
        encoded = predictor.precompute(state, todo, progress=bar.update)
    finally:
        bar.close()
        predictor.close(state)
    location = None if getattr(cache, "in_memory", True) else str(cache.location)
    return {"frames": len(todo), "encoded": encoded, "cached": len(todo) - encoded, "location": location}


def segment_stack(
    stack,
    points=None,
    boxes=None,
    masks=None,
    *,
    obj_ids=None,
    positive=None,
    box_ids=None,
    mask_frame: int = 0,
    model: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    image_size: int | None = None,
    precision: str = "auto",
    feature_cache=None,
    axes: str | None = None,
    channel: int | None = None,
    z: int | None = None,
    z_project: str | None = None,
    along: str | None = None,
    t: int | None = None,
    direction: str = "both",
    auto: dict | None = None,
    out=None,
    overwrite: bool = False,
    predictor: VideoPredictorLike | None = None,
    progress: bool | str = True,
    callback: Callable[[int, np.ndarray], Any] | None = None,
    detect_new=None,
    detect_divisions=False,
    lost_after: int | None = LOST_AFTER,
) -> SegmentationResult:
    """Segment and track objects through a time-lapse with SAM2.

    Parameters
    ----------
    stack
        A path (TIFF / OME-TIFF, Zarr / OME-Zarr, a folder of frames, a glob), a numpy / dask /
        zarr array, or a :class:`napari_sam2.io.Stack`. Any dtype; ``(T, Y, X)`` or axes named by
        ``axes``.
    points
        Clicks, napari order: an ``(N, 3)`` array ``t, y, x`` (a napari Points layer's data),
        ``(N, 4)`` adding ``obj_id``, ``(N, 5)`` adding ``positive``; or a table (DataFrame, dict
        of columns) with ``t, y, x`` and optionally ``obj_id``, ``positive``.
    boxes
        An ``(N, 5)`` array ``t, y0, x0, y1, x1`` (``(N, 6)`` adding ``obj_id``), napari Shapes
        rectangles ``(N, 4, 3)``, or a table with those columns.
    masks
        A label image of one frame ``(Y, X)``: every label becomes the mask prompt of the object
        with that id, on frame ``mask_frame``.
    obj_ids, positive
        Per point: the object id, and True for a click on the object / False on background
        (instead of columns). Points without ids are objects of their own.
    box_ids
        Per box: the object id.
    mask_frame
        The frame of ``masks``, and the frame seeded automatically when there is no prompt.
    model, checkpoint, device, image_size
        Which network: a registry name (``napari-sam2 models``), a checkpoint file (default: the
        official one, downloaded once), ``"cpu"``/``"cuda"``/``"mps"``/``"auto"``, and the network
        input size (default 1024; a multiple of 64, smaller is faster).
    precision
        ``"auto"`` (default: bf16 where the hardware computes it natively, else fp32), ``"fp32"``
        (exactly the reference's numbers) or ``"bf16"``.
    feature_cache
        Where each frame's image features are kept, so that a frame is encoded once across passes and
        runs: None (default: ``$NAPARI_SAM2_FEATURES`` or the user cache folder), a folder, or False.
    axes, channel
        Axes of the source (e.g. ``"TCYX"``) and the channel to segment.
    z, z_project, along, t
        For stacks with a Z axis: the Z plane to segment, or a projection (``"max"``, ``"mean"``,
        ``"min"``), or ``along="Z"`` to propagate through the volume of time point ``t``.
    direction
        ``"forward"`` (from the earliest prompted frame to the end), ``"backward"`` (from the latest
        prompted frame to the start) or ``"both"``. Frames no pass reaches stay 0.
    auto
        Parameters of :class:`napari_sam2.AutomaticMaskGenerator` for seeding objects when no
        prompt is given (e.g. ``dict(points_per_side=16, min_area=50)``), plus ``max_objects``.
    out
        ``None``: labels in memory (numpy). A path: an OME-Zarr store written frame by frame (one
        chunk per frame), appearing under its name only when complete. An array-like of shape
        ``(T, Y, X)``: filled in place.
    overwrite
        Replace an existing store at ``out``.
    predictor
        A ready :class:`napari_sam2.VideoPredictor` to reuse (then ``model``, ``checkpoint``,
        ``device``, ``image_size``, ``precision`` and ``feature_cache`` are not used).
    progress
        Show a progress bar (a string: its label).
    callback
        Called as ``callback(t, labels_t)`` after each frame is written (again for frames tracked
        again after an object was added mid-video).
    detect_new
        Add cells that enter the field (or were missed) while propagating forward: ``True``, an int
        ``K`` (look every K frames), a dict or a :class:`napari_sam2.lineage.NewObjectParams`.
    detect_divisions
        Turn a masklet that splits into two comparable parts into a division (parent ends, two
        daughters start, ``parent`` recorded): ``True``, a dict or a
        :class:`napari_sam2.lineage.DivisionParams`. With either option the backward pass (if any)
        runs first with the prompted objects only, then the forward pass adds objects; the tracks get
        a ``parent`` column. A divided parent's track ends (it is no longer tracked). See
        ``docs/tracking.md``.
    lost_after
        With ``detect_new`` or ``detect_divisions``: an object without a pixel on this many consecutive
        frames of the forward pass has left: its track ends and it is no longer tracked (a cell coming
        back later is found by ``detect_new`` as a new track). ``None``: objects are never ended (SAM2's
        own behaviour, which recovers from any occlusion). Unused without those options.

    Returns
    -------
    SegmentationResult
        ``labels``, ``scores``, ``tracks``, ``obj_ids``, ``path``.

    Raises
    ------
    FileNotFoundError, napari_sam2.io.StackReadError
        The stack cannot be read.
    napari_sam2.prompts.PromptError
        Prompts that are malformed or outside the stack (the message names the row).
    ValueError
        Axes that do not fit the data, a channel out of range, a bad direction.
    """
    start = time.perf_counter()
    plan = _plan(stack, dict(points=points, boxes=boxes, masks=masks, obj_ids=obj_ids, positive=positive,
                             box_ids=box_ids, mask_frame=mask_frame),
                 axes=axes, channel=channel, planes=dict(z=z, z_project=z_project, along=along, t=t),
                 direction=direction, auto=auto, detect_new=detect_new, detect_divisions=detect_divisions,
                 lost_after=lost_after)
    if predictor is None:
        from .predictor.video import build_video_predictor

        predictor = build_video_predictor(model, checkpoint=checkpoint, device=device, image_size=image_size,
                                          precision=precision, feature_cache=feature_cache)
    sink, path = open_label_sink(out, plan.shape, overwrite)
    table = TrackTable()
    try:
        ids, scores, parents = _run(plan, predictor, sink, table, auto, progress, callback)
        if isinstance(sink, ZarrLabelsWriter):
            # frames no pass reached are background: write them so the store is complete
            empty = np.zeros(plan.shape[1:], dtype=LABEL_DTYPE)
            for frame_idx in sink.missing_frames:
                sink.write(frame_idx, empty)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    if path is not None:
        import zarr

        labels = zarr.open_group(str(path), mode="r")["0"]
    else:
        labels = sink.array
    n_frames = plan.shape[0]
    scores = {obj: scores.get(obj, np.full(n_frames, np.nan, np.float32)) for obj in ids}
    tracks = table.to_dataframe(scores)
    if plan.lineage:
        tracks = add_parents(tracks, parents)
    return SegmentationResult(labels=labels, scores=scores, tracks=tracks, obj_ids=list(ids),
                              path=path, seconds=time.perf_counter() - start, parents=parents)


@dataclass
class _Plan:
    """What segment_stack will do, decided (and checked) before any model is built."""

    video: Stack
    shape: tuple[int, int, int]  # T, Y, X
    prompts: Prompts
    first: int  # the frame seeded automatically when there is no prompt
    passes: list
    new_params: Any = None
    div_params: Any = None
    lost_after: int | None = None

    @property
    def lineage(self) -> bool:
        return self.new_params is not None or self.div_params is not None

    @property
    def rgb(self) -> bool:
        return self.video.axes == "TYXC"


def _plan(stack, prompt_args: dict, *, axes, channel, planes, direction, auto, detect_new,
          detect_divisions, lost_after) -> _Plan:
    """Validate, open the stack, read the prompts and check them against it, and plan the passes."""
    from .lineage import division_params, new_object_params

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    video, (n_frames, height, width) = open_video(stack, axes=axes, channel=channel, **planes)
    mask_frame = prompt_args["mask_frame"]
    prompts = build_prompts(prompt_args.pop("points"), prompt_args.pop("boxes"), prompt_args.pop("masks"),
                            **prompt_args)
    prompts.check(n_frames, height, width)
    new_params = new_object_params(detect_new)
    div_params = division_params(detect_divisions)
    lineage = new_params is not None or div_params is not None
    if lost_after is not None and (isinstance(lost_after, bool) or int(lost_after) < 1):
        raise ValueError(f"lost_after must be a number of frames >= 1, or None (never end a lost object), got {lost_after!r}")
    if lineage and direction == "backward":
        raise ValueError("detect_new / detect_divisions work while propagating forward: use direction='forward' or 'both'")
    if new_params is not None and new_params.mask_source is None:
        generator_parameters(new_params.generator)  # fail on bad parameters before building the model
    if not prompts:
        if not 0 <= int(mask_frame) < n_frames:
            raise ValueError(f"mask_frame={mask_frame} (the frame seeded automatically) is outside the stack "
                             f"(frames 0..{n_frames - 1})")
        generator_parameters(auto)  # fail on bad parameters before building the model
        first = last = int(mask_frame)
    else:
        if auto:
            raise ValueError("auto= seeds objects when no prompt is given; prompts were given too: drop one")
        first, last = prompts.frames[0], prompts.frames[-1]
    passes = plan_passes(direction, [first, last], 0, n_frames - 1, backward_first=lineage)
    return _Plan(video, (n_frames, height, width), prompts, first, passes, new_params, div_params,
                 None if lost_after is None else int(lost_after))


def _run(plan: _Plan, run: VideoPredictorLike, sink, table: TrackTable, auto, progress, callback):
    """Prompt (or seed) the objects and run the passes, each label frame to ``sink`` and ``table``;
    returns ``(object ids, object-present scores per object, parents)``."""
    n_frames, height, width = plan.shape
    ids: list[int] = []
    scores: dict[int, np.ndarray] = {}
    parents: dict[int, int] = {}
    name = Path(str(getattr(plan.video, "path", "") or "")).name or "segment"
    # no spill to disk when no pass re-reads another pass's frames
    state = run.init_state(plan.video, history=None if needs_history(plan.passes, n_frames - 1) else "ram")
    try:
        if plan.prompts:
            plan.prompts.apply(run, state, width=width, height=height)
            ids = plan.prompts.obj_ids
        else:
            ids = _seed_automatically(run, state, plan.video, plan.first, auto, plan.rgb)
            if not ids:
                warnings.warn(f"the automatic mask generator found no object on frame {plan.first}: the labels are "
                              "empty. Lower auto['pred_iou_thresh'] / auto['stability_score_thresh'] or give prompts.",
                              RuntimeWarning, stacklevel=3)
        tracker = None
        total = sum(p.frames for p in plan.passes) if ids else 0
        with _progress_bar(progress, total, name) as bar:

            def emit(frame_idx, frame):
                sink.write(frame_idx, frame)
                table.update(frame_idx, frame)
                if callback is not None:
                    callback(frame_idx, frame)
                bar.update(1)

            for p in plan.passes if ids else ():
                if plan.lineage and not p.reverse:  # lineage consumes the forward pass
                    from .lineage import LineageTracker

                    tracker = LineageTracker(run, state, plan.video, ids, plan.new_params, plan.div_params,
                                             rgb=plan.rgb, lost_after=plan.lost_after)
                    tracker.propagate(p.start, emit)
                    continue
                for frame_idx, frame_ids, logits in run_passes(run, state, [p]):
                    emit(frame_idx, logits_to_labels(logits, frame_ids))
        if tracker is not None:
            ids, parents = list(tracker.ids), dict(tracker.parents)
            scores.update(tracker.scores(n_frames))
        else:
            for obj in ids:
                scores[obj] = np.array(state.object_score_logits(obj), dtype=np.float32, copy=True)
    finally:
        run.close(state)
    return ids, scores, parents
