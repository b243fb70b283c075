"""Streaming video predictor for the promptable video segmentation (PVS) task.

The public methods and their semantics are those of the official ``SAM2VideoPredictor``
(``init_state``, ``add_new_points_or_box``, ``add_new_mask``, ``propagate_in_video``,
``clear_all_prompts_in_frame``, ``remove_object``, ``reset_state``), so the official notebooks carry
over. What differs is what is kept: frames are read when needed (never the whole video), image
features of only a couple of frames are cached, each object keeps its conditioning frames and a window
of recent frames in RAM (on the model's device: a GPU copies nothing per step but one small transfer
to the host) and spills older frames to disk, and objects that share a frame and a memory layout are
run as one batch. Masks are yielded on the model's device, as the official predictor does.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..build import build_model, resolve_device
from ..heap import retained_heap
from ..modeling import DEFAULT_MODEL, SAM2
from ..modeling.sam2 import NO_OBJ_SCORE
from .feature_cache import open_feature_cache
from .features import FrameFeatureSource
from .frames import FrameSource
from .postprocess import fill_holes, non_overlapping, resize_logits, to_host
from .preprocess import mask_to_model_input, to_model_coords
from .store import FrameStore, SpillDir

_FORWARD, _REVERSE = 1, 2
# a prompt's result is never the repeat of an earlier one: it gets a fresh number, never a step's key
_PROMPT_VERSIONS = itertools.count(1)


class ObjectTrack:
    """Prompts and tracking results of one object."""

    def __init__(self, obj_id: Any, num_frames: int, spill_dir: str | None, ram_frames: int,
                 device: torch.device | None = None):
        self.obj_id = obj_id
        self.point_inputs: dict[int, dict] = {}
        self.mask_input_frames: set[int] = set()
        self.cond: dict[int, dict] = {}  # conditioning frames, always in RAM
        self.temp: dict[str, dict[int, dict]] = {"cond": {}, "non_cond": {}}  # prompted, not yet in memory
        self.non_cond = FrameStore(num_frames, ram_frames=ram_frames, spill_dir=spill_dir, device=device)
        self.tracked = np.zeros(num_frames, dtype=np.int8)  # 0 untracked, 1 forward, 2 reverse
        self.scores = np.full(num_frames, np.nan, dtype=np.float32)  # object-present logits
        self.end: int | None = None  # first frame the object no longer exists on (an ended track)

    def inputs_key(self, t: int, window: list[int], reverse: bool, settings: tuple) -> int:
        """A key of everything a tracking step of this object on frame t reads besides frame t's
        image features: its conditioning frames (each prompt's result is numbered), the entries of
        the frames in its window (by the keys they were computed from) and the direction. Equal keys:
        the step would compute what it computed before (the reference recomputes it, and gets it)."""
        cond = tuple((f, e.get("version", 0)) for f, e in sorted(self.cond.items()))
        return hash((settings, t, reverse, cond, tuple(self.non_cond.version(f) for f in window))) or 1

    def alive(self, t: int) -> bool:
        return self.end is None or t < self.end

    @property
    def bank(self) -> dict:
        return {"cond_frame_outputs": self.cond, "non_cond_frame_outputs": self.non_cond}

    def output(self, t: int, temp_key: str) -> dict | None:
        """The latest output on frame t: a pending prompt's, else a conditioning or tracked frame's."""
        out = self.temp[temp_key].get(t)
        if out is None:
            out = self.cond.get(t)
        if out is None:
            out = self.non_cond.get(t)
        return out

    def clear(self) -> None:
        self.point_inputs.clear()
        self.mask_input_frames.clear()
        self.cond.clear()
        self.temp["cond"].clear()
        self.temp["non_cond"].clear()
        self.non_cond.clear()
        self.tracked[:] = 0
        self.scores[:] = np.nan
        self.end = None


class VideoState:
    """Everything one video's session holds (the official ``inference_state``)."""

    def __init__(self, frames: FrameSource, device: torch.device, spill: SpillDir | None, ram_frames: int,
                 features: FrameFeatureSource):
        self.frames = frames
        self.device = device
        self.num_frames = frames.num_frames
        self.video_height = frames.height
        self.video_width = frames.width
        self.objects: dict[Any, ObjectTrack] = {}
        self.spill = spill
        self.ram_frames = ram_frames
        self.features = features
        self._objects_made = 0

    @property
    def obj_ids(self) -> list:
        return list(self.objects)

    def __getitem__(self, key: str):
        # the official state is a dict: keep its common keys readable
        if key in ("num_frames", "video_height", "video_width", "obj_ids", "device"):
            return getattr(self, key)
        raise KeyError(key)

    def new_object(self, obj_id) -> ObjectTrack:
        self._objects_made += 1
        spill_dir = self.spill.sub(f"obj{self._objects_made:05d}") if self.spill else None
        obj = ObjectTrack(obj_id, self.num_frames, spill_dir, self.ram_frames, self.device)
        self.objects[obj_id] = obj
        return obj

    @property
    def intensity_range(self) -> tuple[float, float]:
        """The (lo, hi) intensities mapped to 0 and 1 for the whole stack."""
        return self.frames.range

    def track_end(self, obj_id) -> int | None:
        """The first frame ``obj_id`` no longer exists on (see ``VideoPredictor.end_object``), None if it lives."""
        return self.objects[obj_id].end

    def object_score_logits(self, obj_id) -> np.ndarray:
        """Object-present logit per frame for ``obj_id`` (> 0: visible; NaN: not computed)."""
        return self.objects[obj_id].scores


class VideoPredictor:
    """Segment and track objects through a video from prompts on any frames.

    Parameters
    ----------
    model
        A :class:`~napari_sam2.modeling.SAM2` network (see :func:`napari_sam2.build_model`).
    fill_hole_area
        Background holes of at most this many pixels (at 256 x 256) in a mask are filled (8, as the
        official video predictor; the official code skips this on machines without its CUDA extension).
    non_overlap_masks
        Give every pixel to at most one object in the outputs.
    history
        ``"disk"`` (default): tracked frames beyond the RAM window go to a temporary folder, so
        re-propagation and corrections behave exactly as in the official predictor. ``"ram"``: they
        are dropped (bounded RAM and no disk, for one-pass batch runs).
    ram_frames
        Tracked frames per object kept in RAM (at least 16: what one step reads).
    add_all_frames_to_correct_as_cond
        A correction click on a tracked frame makes it a conditioning frame, so that a later
        propagation over it keeps the correction (off by default, as in the official predictor, where
        re-propagating through a corrected frame overwrites it; the napari plugin turns it on).
    max_batch
        Most objects run as one batch. Default: 4 on the CPU (there a step is compute-bound, and larger
        batches only thrash the caches: measured 2.7 s per object at 1 to 5 objects, 3.0 s at 10),
        16 on MPS (math attention over 28.7k memory tokens), 64 on a CUDA GPU
        (``benchmarks/bench_batch.py`` measures it on a machine).
    feature_cache
        Where image features are kept so that each frame is encoded once across prompts, passes,
        sessions and runs: None (default) -> ``$NAPARI_SAM2_FEATURES`` or ``features/`` in the
        download cache folder; a folder; False -> none (only the last 2 frames stay in RAM).
        See :mod:`napari_sam2.predictor.feature_cache`.
    """

    def __init__(
        self,
        model: SAM2,
        fill_hole_area: int = 8,
        non_overlap_masks: bool = False,
        history: str = "disk",
        ram_frames: int = 16,
        spill_dir: str | None = None,
        add_all_frames_to_correct_as_cond: bool = False,
        max_batch: int | None = None,
        feature_cache=None,
    ):
        if history not in ("disk", "ram"):
            raise ValueError(f"history must be 'disk' or 'ram', got {history!r}")
        self.model = model.eval()
        self.image_size = model.image_size
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.history = history
        self.ram_frames = max(ram_frames, 16)
        self.spill_dir = spill_dir
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.max_batch = max_batch
        self.feature_cache = open_feature_cache(feature_cache)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def precision(self) -> str:
        return self.model.precision

    # ------------------------------------------------------------------ state
    @torch.inference_mode()
    def init_state(
        self,
        video,
        *,
        axes: str | None = None,
        channel: int | None = None,
        normalize: str | tuple[float, float] = "percentile",
        percentiles: tuple[float, float] = (0.5, 99.5),
        history: str | None = None,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        async_loading_frames: bool = False,
    ) -> VideoState:
        """Open a video for a session. Nothing is read but a sample for the intensity range.

        ``video``: numpy / dask / zarr array ((T, Y, X), (T, Y, X, C) or any axes named by ``axes``), a
        path (TIFF, Zarr, folder of frames) or a :class:`napari_sam2.io.Stack`; any dtype. The
        ``offload_*`` and ``async_loading_frames`` flags of the official API are accepted and not needed.
        ``history`` overrides the predictor's setting for this session ("disk" or "ram").
        """
        history = self.history if history is None else history
        if history not in ("disk", "ram"):
            raise ValueError(f"history must be 'disk' or 'ram', got {history!r}")
        frames = FrameSource(video, self.image_size, axes=axes, channel=channel, normalize=normalize, percentiles=percentiles)
        spill = SpillDir(self.spill_dir) if history == "disk" else None
        features = FrameFeatureSource(frames, self.model, self.feature_cache)
        return VideoState(frames, self.device, spill, self.ram_frames, features)

    @torch.inference_mode()
    def precompute(self, state: VideoState, frames: Iterable[int] | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
        """Encode ``frames`` (default: all) of the session's video into the feature cache, so that later
        clicks and passes only run the decoder and the memory; returns how many frames were encoded
        (the rest were cached already). ``progress(1)`` is called after each frame."""
        if frames is not None:
            frames = [self._check_frame(state, t) for t in frames]
        return state.features.precompute(frames, progress)

    @torch.inference_mode()
    def reset_state(self, state: VideoState) -> None:
        """Remove every object with its prompts and results."""
        for obj in state.objects.values():
            obj.clear()
        state.objects.clear()

    def close(self, state: VideoState) -> None:
        """Free the session's spilled frames on disk now (they also go when the state is collected)."""
        self.reset_state(state)
        state.features.close()
        if state.spill is not None:
            state.spill.cleanup()

    def _object(self, state: VideoState, obj_id, create: bool) -> ObjectTrack:
        if obj_id in state.objects:
            return state.objects[obj_id]
        if create:
            return state.new_object(obj_id)
        raise KeyError(f"unknown object id {obj_id!r}; the session's objects are {state.obj_ids}.")

    # ------------------------------------------------------------------ running the network
    def _run(
        self,
        state: VideoState,
        objs: list[ObjectTrack],
        t: int,
        *,
        is_init_cond_frame: bool,
        reverse: bool,
        run_mem_encoder: bool,
        point_inputs: dict | None = None,
        mask_inputs: torch.Tensor | None = None,
        prev_mask_logits: torch.Tensor | None = None,
    ) -> tuple[list[dict], np.ndarray]:
        """One tracking step for objects that share frame t's memory layout, as one batch: each object's
        entry (on the model's device) and its object score (on the host)."""
        feats = state.features(t).expand(len(objs))
        bank = self._batched_bank(objs, t, state.num_frames, reverse) if not is_init_cond_frame else None
        out = self.model.track_step(
            feats,
            frame_idx=t,
            is_init_cond_frame=is_init_cond_frame,
            memory=bank,
            num_frames=state.num_frames,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            reverse=reverse,
            run_mem_encoder=run_mem_encoder,
            prev_mask_logits=prev_mask_logits,
        )
        pred = out["pred_masks"].float()  # B x 1 x 256 x 256
        scores = out["object_score_logits"].float()  # B x 1
        # the step's one device -> host transfer: what the CPU needs (scores, hole filling's background)
        host_scores, background = to_host(scores, pred <= 0 if self.fill_hole_area > 0 else None)
        if self.fill_hole_area > 0:
            pred = fill_holes(pred, self.fill_hole_area, background=background)
        # the results stay on the model's device (the RAM window is read there by the next steps); each
        # object's entry is its own copy (a slice would keep, and spill, the whole batch's storage)
        mem = out["maskmem_features"]
        batch = {
            # memories are kept in bf16, as the official predictor does: half the storage
            "maskmem_features": None if mem is None else mem.to(torch.bfloat16),
            "pred_masks": pred,
            "obj_ptr": out["obj_ptr"].float(),
            "object_score_logits": scores,
        }
        entries = [{k: None if v is None else v[i : i + 1].clone() for k, v in batch.items()} for i in range(len(objs))]
        return entries, host_scores.reshape(-1)

    def _bank_window(self, t: int, num_frames: int, reverse: bool) -> list[int]:
        spatial, ptrs = self.model.memory_frames(t, num_frames, reverse)
        return sorted(set(spatial) | set(ptrs))

    def _batched_bank(self, objs: list[ObjectTrack], t: int, num_frames: int, reverse: bool) -> dict:
        if len(objs) == 1:
            return objs[0].bank

        def cat(entries: list[dict]) -> dict:
            return {k: torch.cat([e[k] for e in entries]) for k in ("maskmem_features", "obj_ptr")}

        cond = {f: cat([o.cond[f] for o in objs]) for f in objs[0].cond}
        non_cond = {}
        for f in self._bank_window(t, num_frames, reverse):
            entries = [o.non_cond.get(f) for o in objs]
            if entries[0] is not None:
                non_cond[f] = cat(entries)
        return {"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond}

    def _groups(self, objs: list[ObjectTrack], t: int, num_frames: int, reverse: bool) -> list[list[ObjectTrack]]:
        """Objects whose memory banks have the same layout on frame t can run as one batch."""
        window = self._bank_window(t, num_frames, reverse)
        groups: dict[tuple, list[ObjectTrack]] = {}
        for o in objs:
            key = (tuple(o.cond), o.non_cond.has_mask(window))
            groups.setdefault(key, []).append(o)
        cap = self.max_batch or default_max_batch(self.device)
        return [g[i : i + cap] for g in groups.values() for i in range(0, len(g), cap)]

    # ------------------------------------------------------------------ outputs
    def _video_res(self, state: VideoState, masks: torch.Tensor) -> torch.Tensor:
        """N x 1 x h x w logits -> N x 1 x H x W at the video's resolution."""
        size = (state.video_height, state.video_width)
        if tuple(masks.shape[-2:]) != size:
            masks = resize_logits(masks, size)
        if self.non_overlap_masks:
            masks = non_overlapping(masks)
        return masks

    def _frame_output(self, state: VideoState, t: int, temp_key: str):
        """All objects' current masks on frame t, as the official predictor returns after a prompt."""
        size = (state.video_height, state.video_width)
        masks = torch.full((len(state.objects), 1, *size), NO_OBJ_SCORE, dtype=torch.float32, device=state.device)
        for i, obj in enumerate(state.objects.values()):
            out = obj.output(t, temp_key)
            if out is not None:
                masks[i : i + 1] = resize_logits(out["pred_masks"], size)
        return t, state.obj_ids, self._video_res(state, masks)

    # ------------------------------------------------------------------ prompts
    def _check_frame(self, state: VideoState, frame_idx) -> int:
        state.frames.check_index(frame_idx)
        return int(frame_idx)

    def _prompt_points(self, state, points, labels, box, normalize_coords) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate clicks / box and return them as 1 x N x 2 model-space coordinates and 1 x N labels."""
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together (one label per point: 1 positive, 0 negative).")
        if points is None and box is None:
            raise ValueError("give at least one prompt: points with labels, or a box.")
        pts = torch.zeros(0, 2) if points is None else torch.as_tensor(np.asarray(points, dtype=np.float32))
        lab = torch.zeros(0, dtype=torch.int32) if labels is None else torch.as_tensor(np.asarray(labels)).to(torch.int32)
        if pts.numel() == 0 and box is None:
            raise ValueError("points is empty: give at least one point, or a box.")
        pts = pts.reshape(0, 2) if pts.numel() == 0 else pts
        pts = pts.reshape(-1, 2) if pts.ndim == 3 and pts.shape[0] == 1 else pts
        lab = lab.reshape(-1) if lab.ndim == 2 and lab.shape[0] == 1 else lab
        if pts.ndim != 2 or pts.shape[-1] != 2:
            raise ValueError(f"points must have shape (N, 2) as (x, y) pairs, got {tuple(pts.shape)}.")
        if lab.ndim != 1 or lab.shape[0] != pts.shape[0]:
            raise ValueError(f"got {pts.shape[0]} points but labels of shape {tuple(lab.shape)}: give one label per point.")
        if points is not None and pts.shape[0] == 0 and box is None:
            raise ValueError("points is empty: give at least one point, or a box.")
        if lab.numel() and not bool(((lab >= 0) & (lab <= 3)).all()):
            raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {lab.tolist()}.")
        if not torch.isfinite(pts).all():
            raise ValueError("points contain NaN or infinite coordinates.")
        w, h = (state.video_width, state.video_height) if normalize_coords else (1.0, 1.0)
        if box is not None:
            b = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(-1)
            if b.numel() != 4 or not torch.isfinite(b).all():
                raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}.")
            if b[2] < b[0] or b[3] < b[1]:
                raise ValueError(f"box (x0, y0, x1, y1) = {b.tolist()} has x1 < x0 or y1 < y0.")
            pts = torch.cat([b.reshape(2, 2), pts])
            lab = torch.cat([torch.tensor([2, 3], dtype=torch.int32), lab])
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
        if outside.any():
            where = "the normalised range [0, 1]" if not normalize_coords else f"the {state.video_width} x {state.video_height} (width x height) frame"
            raise ValueError(f"prompt coordinates {pts[outside].tolist()} (x, y) lie outside {where}.")
        pts = to_model_coords(pts, (h, w), self.image_size)
        return pts[None], lab[None]

    def _prepare_prompt(self, state: VideoState, obj: ObjectTrack, t: int):
        """Whether the prompt starts the object on t (else it corrects a tracked frame), its direction,
        and where its output goes. A prompt past an ended object's end brings it back to life."""
        if not obj.alive(t):
            obj.end = None
        is_init = bool(obj.tracked[t] == 0)
        reverse = bool(obj.tracked[t] == _REVERSE)
        key = "cond" if is_init or self.add_all_frames_to_correct_as_cond else "non_cond"
        return is_init, reverse, key

    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        inference_state: VideoState,
        frame_idx: int,
        obj_id,
        points=None,
        labels=None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box=None,
    ):
        """Add clicks (and/or a box) for an object on a frame; returns ``(frame_idx, obj_ids, masks)``
        with every object's mask logits on that frame, N x 1 x H x W at the video's resolution.

        Points are (x, y) pixels of the video frame (or [0, 1] with ``normalize_coords=False``);
        labels 1 positive, 0 negative; box (x0, y0, x1, y1). On a frame not yet tracked for the object
        the prompt makes it a conditioning frame; on a tracked frame it corrects the tracked mask.
        """
        state = inference_state
        t = self._check_frame(state, frame_idx)
        pts, lab = self._prompt_points(state, points, labels, box, normalize_coords)
        if box is not None and not clear_old_points:
            raise ValueError("a box must come before any click on a frame: use clear_old_points=True with a box.")
        state.features(t)  # a frame that cannot be read fails here, before the session changes
        obj = self._object(state, obj_id, create=True)
        old = None if clear_old_points else obj.point_inputs.get(t)
        if old is not None:
            pts = torch.cat([old["point_coords"], pts], dim=1)
            lab = torch.cat([old["point_labels"], lab], dim=1)
        point_inputs = {"point_coords": pts, "point_labels": lab}
        obj.point_inputs[t] = point_inputs
        obj.mask_input_frames.discard(t)
        is_init, reverse, key = self._prepare_prompt(state, obj, t)
        prev = obj.output(t, key)
        prev_logits = None
        if prev is not None and prev["pred_masks"] is not None:
            prev_logits = prev["pred_masks"].to(self.device).clamp(-32.0, 32.0)
        dev_points = {k: v.to(self.device) for k, v in point_inputs.items()}
        # memory is encoded when propagation starts, after all prompts of the round are in
        (out,), (score,) = self._run(
            state, [obj], t, is_init_cond_frame=is_init, reverse=reverse, run_mem_encoder=False,
            point_inputs=dev_points, prev_mask_logits=prev_logits,
        )
        obj.temp[key][t] = out
        obj.scores[t] = score
        return self._frame_output(state, t, key)

    add_new_points = add_new_points_or_box

    @torch.inference_mode()
    def add_new_mask(self, inference_state: VideoState, frame_idx: int, obj_id, mask):
        """Give an object's mask on a frame (H x W, the video's size; non-zero = object)."""
        state = inference_state
        t = self._check_frame(state, frame_idx)
        m = torch.as_tensor(np.asarray(mask))
        if m.ndim != 2:
            raise ValueError(f"mask must be a 2D (H, W) array, got shape {tuple(m.shape)}.")
        if tuple(m.shape) != (state.video_height, state.video_width):
            raise ValueError(
                f"mask shape {tuple(m.shape)} does not match the video's frames {(state.video_height, state.video_width)} (H, W)."
            )
        m = (m > 0).float()[None, None]
        m = mask_to_model_input(m, self.image_size)
        state.features(t)  # a frame that cannot be read fails here, before the session changes
        obj = self._object(state, obj_id, create=True)
        obj.mask_input_frames.add(t)
        obj.point_inputs.pop(t, None)
        is_init, reverse, key = self._prepare_prompt(state, obj, t)
        (out,), (score,) = self._run(
            state, [obj], t, is_init_cond_frame=is_init, reverse=reverse, run_mem_encoder=False, mask_inputs=m.to(self.device)
        )
        obj.temp[key][t] = out
        obj.scores[t] = score
        return self._frame_output(state, t, key)

    @torch.inference_mode()
    def clear_all_prompts_in_frame(self, inference_state: VideoState, frame_idx: int, obj_id, need_output: bool = True):
        """Remove an object's clicks, box or mask on one frame."""
        state = inference_state
        t = self._check_frame(state, frame_idx)
        obj = self._object(state, obj_id, create=False)
        obj.point_inputs.pop(t, None)
        obj.mask_input_frames.discard(t)
        obj.temp["cond"].pop(t, None)
        obj.temp["non_cond"].pop(t, None)
        out = obj.cond.pop(t, None)
        if out is not None:
            # it stays a tracked frame's result until propagation recomputes it
            obj.non_cond[t] = out
            obj.tracked[t] = 0
        if not need_output:
            return None
        key = "cond" if any(t in o.temp["cond"] for o in state.objects.values()) else "non_cond"
        return self._frame_output(state, t, key)

    @torch.inference_mode()
    def remove_object(self, inference_state: VideoState, obj_id, strict: bool = False, need_output: bool = True):
        """Forget an object; returns ``(obj_ids, [(frame_idx, masks), ...])`` for its prompted frames."""
        state = inference_state
        if obj_id not in state.objects:
            if strict:
                raise KeyError(f"cannot remove object id {obj_id!r}: the session's objects are {state.obj_ids}.")
            return state.obj_ids, []
        if len(state.objects) == 1:
            self.reset_state(state)
            return state.obj_ids, []
        obj = state.objects[obj_id]
        frames = sorted(set(obj.point_inputs) | obj.mask_input_frames)
        for t in frames:
            self.clear_all_prompts_in_frame(state, t, obj_id, need_output=False)
        obj.clear()
        del state.objects[obj_id]
        updated = []
        if need_output:
            for t in frames:
                key = "cond" if any(t in o.temp["cond"] for o in state.objects.values()) else "non_cond"
                updated.append(self._frame_output(state, t, key)[::2])
        return state.obj_ids, updated

    @torch.inference_mode()
    def end_object(self, inference_state: VideoState, obj_id, frame_idx: int) -> None:
        """End an object's track: from ``frame_idx`` on it no longer exists (a cell that divided into
        daughters, or left the field). Propagation in either direction no longer tracks it (nor yields
        it) on those frames, its results there are dropped and its RAM window is released (to the spill
        folder with ``history="disk"``, so re-tracking earlier frames still sees its memories). Earlier
        frames keep their results; a new prompt on or after ``frame_idx`` brings the object back."""
        state = inference_state
        t = self._check_frame(state, frame_idx)
        obj = self._object(state, obj_id, create=False)
        later = [f for f in sorted(set(obj.point_inputs) | obj.mask_input_frames) if f >= t]
        if later:
            raise ValueError(f"object {obj_id!r} has prompts on frame(s) {later}, on or after frame {t} where it "
                             "would end: clear them first (clear_all_prompts_in_frame) or end it later.")
        obj.end = t if obj.end is None else min(obj.end, t)
        for f in [f for f in obj.non_cond.frames() if f >= t]:
            obj.non_cond.discard(f)
        for key in ("cond", "non_cond"):
            for f in [f for f in obj.temp[key] if f >= t]:
                del obj.temp[key][f]
        obj.tracked[t:] = 0
        obj.scores[t:] = np.nan
        obj.non_cond.release()

    # ------------------------------------------------------------------ propagation
    def _preflight(self, state: VideoState) -> None:
        """Encode the memories of the prompted frames and move them into the memory banks."""
        if not state.objects:
            raise RuntimeError("no prompt yet: add points, a box or a mask for at least one object before propagating.")
        for obj in state.objects.values():
            for key in ("non_cond", "cond"):
                for t, out in obj.temp[key].items():
                    if out["maskmem_features"] is None:
                        feats = state.features(t)
                        high = resize_logits(out["pred_masks"].to(self.device), (self.image_size,) * 2)
                        mem = self.model.encode_memory(feats, high, out["object_score_logits"].to(self.device), True)
                        out["maskmem_features"] = mem.to(torch.bfloat16)
                    if key == "cond":
                        out["version"] = next(_PROMPT_VERSIONS)
                        obj.cond[t] = out
                    else:
                        obj.non_cond[t] = out
                obj.temp[key].clear()
            if not obj.cond:
                raise RuntimeError(
                    f"object {obj.obj_id!r} has no prompt on any frame: add points, a box or a mask for it, or remove it."
                )
            for t in obj.cond:
                obj.non_cond.discard(t)

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: VideoState) -> None:
        """Move the round's prompts into the memory banks (propagation does this itself; the official
        API lets a caller do it first)."""
        self._preflight(inference_state)

    @torch.inference_mode()
    def propagate_in_video(
        self,
        inference_state: VideoState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list, torch.Tensor]]:
        """Track every object through the video, yielding ``(frame_idx, obj_ids, masks)`` frame by
        frame as soon as each is done (masks: N x 1 x H x W logits at the video's resolution)."""
        state = inference_state
        with retained_heap():
            self._preflight(state)
            order = self._order(state, start_frame_idx, max_frame_num_to_track, reverse)
            yield from self._propagate(state, order, reverse)

    def _order(self, state: VideoState, start: int | None, max_frames: int | None, reverse: bool) -> list[int]:
        """The frames a pass visits, in order (the official API's defaults: from the first prompted frame
        to the end of the video, or back to its start)."""
        n = state.num_frames
        if start is None:
            start = min(t for o in state.objects.values() for t in o.cond)
        else:
            start = self._check_frame(state, start)
        if max_frames is None:
            max_frames = n
        if reverse:
            end = max(start - max_frames, 0)
            return list(range(start, end - 1, -1)) if start > 0 else []
        return list(range(start, min(start + max_frames, n - 1) + 1))

    def _propagate(self, state: VideoState, order: list[int], reverse: bool):
        n = state.num_frames
        objs = list(state.objects.values())
        settings = self._step_settings(n)
        for i, t in enumerate(order):
            if i + 1 < len(order):
                state.features.prefetch(order[i + 1])
            masks: dict[Any, torch.Tensor] = {}
            to_track, keys = [], {}
            window = self._bank_window(t, n, reverse)
            live = [o for o in objs if o.alive(t)]  # an ended track costs nothing from its end on
            for o in live:
                if t in o.cond:
                    masks[o.obj_id] = o.cond[t]["pred_masks"]
                    continue
                key = keys[o.obj_id] = o.inputs_key(t, window, reverse, settings)
                if self._reusable(o, t, key):
                    masks[o.obj_id] = o.non_cond[t]["pred_masks"]
                else:
                    to_track.append(o)
            for group in self._groups(to_track, t, n, reverse):
                outs, scores = self._run(state, group, t, is_init_cond_frame=False, reverse=reverse, run_mem_encoder=True)
                for o, out, score in zip(group, outs, scores):
                    o.non_cond.put(t, out, keys[o.obj_id])
                    masks[o.obj_id] = out["pred_masks"]
                    o.scores[t] = score
            for o in live:
                o.tracked[t] = _REVERSE if reverse else _FORWARD
            if not live:  # every track has ended: nothing left to run
                yield t, [], torch.zeros((0, 1, state.video_height, state.video_width), device=state.device)
                continue
            stacked = torch.cat([masks[o.obj_id] for o in live])
            yield t, [o.obj_id for o in live], self._video_res(state, stacked)

    @staticmethod
    def _reusable(obj: ObjectTrack, t: int, key: int) -> bool:
        """Re-propagation: the object's step on t already ran on exactly these inputs (its prompts did
        not change since), so its result stands, as recomputing it would give."""
        return obj.non_cond.version(t) == key

    def _step_settings(self, num_frames: int) -> tuple:
        """What, besides an object's memory bank, a step's result depends on: the network (the same
        module with the same weights: replaced or edited tensors change their address or version)
        and hole filling."""
        params = list(self.model.parameters())
        # a model built under inference mode has inference tensors, which keep no version counter
        versions = sum(0 if p.is_inference() else p._version for p in params)
        weights = (sum(p.data_ptr() for p in params), versions, str(self.model.compute_dtype))
        return (id(self.model), weights, self.fill_hole_area, num_frames)


def build_video_predictor(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    image_size: int | None = None,
    precision: str = "auto",
    **kwargs,
) -> VideoPredictor:
    """A :class:`VideoPredictor` for the registry model ``name`` (official weights unless ``checkpoint``).

    Extra keyword arguments go to :class:`VideoPredictor` (``fill_hole_area``, ``non_overlap_masks``,
    ``history``, ``feature_cache``, ...). ``device="auto"`` picks CUDA, then MPS, then the CPU;
    ``precision`` is ``"auto"``, ``"fp32"`` or ``"bf16"`` (see :func:`napari_sam2.build_model`).
    """
    model = build_model(name, checkpoint=checkpoint, device=resolve_device(device), image_size=image_size,
                        precision=precision)
    return VideoPredictor(model, **kwargs)


def default_max_batch(device: torch.device) -> int:
    """Objects per batch: on a CPU a step is compute-bound and bigger batches only thrash the caches;
    MPS runs math attention (its memory grows with the batch); a CUDA GPU wants wide batches."""
    return {"cpu": 4, "mps": 16}.get(device.type, 64)
