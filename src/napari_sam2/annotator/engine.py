"""The interactive session behind the napari widget, without Qt: prompts in, masks out, nothing in the GUI thread.

The GUI thread only reads the layers (a cheap copy of the prompts) and asks for work; everything
heavy (building the model and downloading its weights, encoding frames, decoding a click, propagating,
automatic seeding, exporting) runs in one worker thread (:class:`~.tasks.TaskQueue`), in order. What
the viewer must show comes back through ``post`` as calls of an :class:`AnnotatorListener`.

Prompts are applied as soon as they can be: a click waits only for the step in flight. During a
propagation, the pass stops after the frame being computed, the new prompts are applied (their frames'
masks shown) and the pass goes on from the next frame with them; frames it had already passed keep
their masks until the next "Propagate".
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..labels import logits_to_labels
from ..propagation import plan_passes
from .choices import AnnotatorError, LineageOptions, ModelChoice
from .layer_prompts import FramePrompt, collect_prompts, diff_prompts, mask_digest
from .objects import ObjectInfo, ObjectPresence
from .stack_view import StackView
from .tasks import Cancelled, Post, Task, TaskListener, TaskQueue

__all__ = ["Annotator", "AnnotatorError", "AnnotatorListener", "LineageOptions", "ModelChoice"]

OBJECTS_EVERY_S = 0.5  # the object list is refreshed at most this often during a propagation


class AnnotatorListener(TaskListener, Protocol):
    """What the viewer is told, always in the GUI thread."""

    def show_frame(self, t: int, labels: np.ndarray) -> None:
        """Frame t of the video has these labels (label = object id)."""

    def erase_objects(self, obj_ids: list[int] | None) -> None:
        """Remove these objects' labels from every frame (None: all)."""

    def show_status(self, text: str) -> None: ...

    def show_objects(self, objects: list[ObjectInfo]) -> None: ...

    def model_ready(self, text: str) -> None: ...

    def model_trained(self, checkpoint: str | None, text: str) -> None:
        """Fine-tuning ended; the session now runs ``checkpoint`` (None: it kept a model chosen meanwhile).
        Optional: a listener without it is shown ``text`` as a status."""


class Annotator:
    """One interactive SAM2 session over the image in view. Call its methods from the GUI thread."""

    def __init__(self, post: Post, listener: AnnotatorListener,
                 build: Callable[[ModelChoice, Callable[[int, int | None], None]], Any] | None = None):
        self._post = post
        self.listener = listener
        self._build = build or _build_predictor
        self.queue = TaskQueue(self._post_current, listener)
        self._lock = threading.Lock()
        # asked for by the GUI
        self.choice: ModelChoice | None = None
        self.view: StackView | None = None
        self.generation = 0  # bumped with each new view: frames of an older one are not shown
        self._layer_prompts: dict[tuple[int, int], FramePrompt] = {}
        self._masks: dict[tuple[int, int], np.ndarray] = {}
        self._dirty = False
        self._closed = False
        # owned by the worker thread
        self._predictor = None
        self._built: ModelChoice | None = None
        self._state = None
        self._state_view: StackView | None = None
        self._state_generation = 0
        self._applied: dict[tuple[int, int], tuple] = {}
        self._presence = ObjectPresence()
        self.parents: dict[int, int] = {}
        self._objects_posted = 0.0
        self.last_training = None  # the TrainingSummary of the last fine-tuning that finished

    # ================================================================= GUI thread
    def choose_model(self, choice: ModelChoice) -> None:
        with self._lock:  # a fine-tuning that ends switches the choice only if it is still the one it trained
            self.choice = choice

    def show(self, view: StackView | None) -> bool:
        """Segment ``view`` from now on; True when it is another video than before (its session starts empty)."""
        if view is not None and view.same_as(self.view):
            return False
        if self.view is not None:
            self.cancel()  # work on the old video is moot
        with self._lock:
            self.view = view
            self.generation += 1
            self._layer_prompts = {}
            self._masks = {}
        return True

    def sync(self, points=None, boxes=None) -> Task | None:
        """Read the prompt layers now; the predictor gets what changed as soon as the worker is free."""
        view = self.view
        if view is None:
            return None
        prompts = collect_prompts(view, points, boxes)
        with self._lock:
            self._layer_prompts = prompts
            self._dirty = True
        return self._submit("prompts", self._apply_task, key="prompts", first=True)

    def use_mask(self, t: int, obj_id: int, mask: np.ndarray) -> Task | None:
        """A painted mask as the prompt of object ``obj_id`` on frame ``t`` (SAM2's mask prompt)."""
        mask = np.asarray(mask, bool)
        view = self.view
        if view is None:
            raise AnnotatorError("no image to segment: choose an image layer first.")
        if mask.shape != (view.height, view.width):
            raise AnnotatorError(f"the mask has shape {mask.shape}, the frames {(view.height, view.width)}")
        if not mask.any():
            raise AnnotatorError(f"label {obj_id} is not painted on frame {t}: paint it in the masklets layer first.")
        with self._lock:
            self._masks[(int(t), int(obj_id))] = mask
            self._dirty = True
        return self._submit("mask prompt", self._apply_task, key="prompts", first=True)

    @property
    def mask_prompts(self) -> dict[tuple[int, int], np.ndarray]:
        with self._lock:
            return dict(self._masks)

    def load(self) -> Task:
        return self._submit("load model", lambda task: self._ensure_predictor(task))

    def propagate(self, direction: str = "both", lo: int = 0, hi: int | None = None,
                  lineage: LineageOptions | None = None) -> Task:
        return self._submit(f"propagate {direction}", lambda task: self._propagate(task, direction, lo, hi, lineage))

    def precompute(self, lo: int = 0, hi: int | None = None) -> Task:
        return self._submit("precompute", lambda task: self._precompute(task, lo, hi))

    def segment_all(self, t: int, auto: dict | None = None, frame_labels: np.ndarray | None = None) -> Task:
        """One new object per cell the automatic mask generator finds on frame ``t`` (cells already
        labelled on ``frame_labels`` are left alone)."""
        from ..predictor.generator_parameters import generator_parameters

        generator_parameters(auto)  # bad parameters fail here, not in the worker
        labels = None if frame_labels is None else np.array(frame_labels, copy=True)
        return self._submit(f"segment all on frame {t}", lambda task: self._segment_all(task, int(t), auto, labels))

    def remove_object(self, obj_id: int) -> Task:
        """Forget object ``obj_id``: its mask prompts here, its session in the predictor, its labels.
        (Its clicks and boxes are removed from the layers by the caller.)"""
        with self._lock:
            self._masks = {k: v for k, v in self._masks.items() if k[1] != obj_id}
            self._layer_prompts = {k: v for k, v in self._layer_prompts.items() if k[1] != obj_id}
        return self._submit(f"remove object {obj_id}", lambda task: self._remove(task, [int(obj_id)]))

    def reset(self) -> Task:
        with self._lock:
            self._masks = {}
            self._layer_prompts = {}
        return self._submit("reset", lambda task: self._remove(task, None))

    def export(self, path, fmt: str | None, labels: np.ndarray) -> Task:
        """Write a copy of the ``(T, Y, X)`` labels (taken now) as OME-Zarr, TIFF or a CTC folder."""
        video = np.array(labels, copy=True)
        parents = dict(self.parents)
        return self._submit(f"export {path}", lambda task: self._export(task, path, fmt, video, parents))

    def train(self, labels, out, steps: int = 50, image_size: int | None = None, lora: int | None = None,
              num_frames: int = 8, **options) -> Task:
        """Fine-tune the current model on the video in view and ``labels`` (e.g. the corrected masklets,
        ``(T, Y, X)`` like the video, or the masklets layer's own shape) into checkpoint ``out``; then the
        session runs it (same model name, ``checkpoint=out``). ``options`` go to
        :func:`napari_sam2.train.loop.finetune` (``augment``, ``val_every``, ``lr``, ``seed``...).

        Shapes and paths are checked here (:class:`AnnotatorError`); the labels are read in the worker."""
        from .finetuning import check_request

        with self._lock:
            view, choice = self.view, self.choice
        labels, request = check_request(view, choice, labels, out, steps, image_size, lora, num_frames, options)
        return self._submit(f"fine-tune {request.out.name}", lambda task: self._train(task, choice, view, labels, request))

    def cancel(self) -> list[Task]:
        """Stop the task running after its current step and drop the queued ones."""
        return self.queue.cancel()

    def stop(self, reason: str) -> None:
        """The image went away: stop all work and forget the session, saying why."""
        self.cancel()
        self.show(None)
        self._submit("close session", lambda task: self._close_state())
        self.listener.show_status(f"stopped: {reason}")

    def close(self, timeout: float = 10.0) -> bool:
        """Stop everything (the viewer is closing); True when the worker thread has ended."""
        if self._closed:
            return not self.queue.alive
        self._closed = True
        return self.queue.close(timeout, final=self._close_state)

    @property
    def busy(self) -> bool:
        return not self.queue.idle

    # ================================================================= plumbing
    def _submit(self, name: str, run, key: str | None = None, first: bool = False) -> Task:
        task = Task(name, run, key=key)
        if self._closed:
            raise AnnotatorError("the widget was closed")
        self.queue.submit(task, first=first)  # prompts go first: the user is waiting for that mask
        return task

    def _post_current(self, call: Callable[[], None]) -> None:
        if not self._closed:
            self._post(lambda: None if self._closed else call())

    def _tell(self, method: str, *args) -> None:
        """Call ``listener.method(*args)`` in the GUI thread, unless the view changed meanwhile."""
        generation = self._state_generation
        listener = self.listener

        def call():
            if generation == self.generation and not self._closed:
                getattr(listener, method)(*args)

        self._post_current(call)

    def _say(self, text: str) -> None:
        self._post_current(lambda: self.listener.show_status(text))

    # ================================================================= worker thread
    def _ensure_predictor(self, task: Task):
        choice = self.choice
        if choice is None:
            raise AnnotatorError("no model chosen")
        if self._predictor is not None and choice == self._built:
            return self._predictor
        self._close_state()
        self._predictor = self._built = None
        self._say(f"loading {choice.model} ...")
        predictor = self._build(choice, lambda n, total: task.advance(n, total))
        self._predictor, self._built = predictor, choice
        model = predictor.model
        text = f"{choice.model} loaded on {model.device} in {getattr(model, 'precision', 'fp32')}"
        self._post_current(lambda: self.listener.model_ready(text))
        return predictor

    def _ensure_state(self, task: Task):
        predictor = self._ensure_predictor(task)
        with self._lock:
            view, generation = self.view, self.generation
        if view is None:
            raise AnnotatorError("no image to segment: open a time-lapse (or an image) and choose it as 'Image'.")
        if self._state is None or self._state_generation != generation:
            self._close_state()
            try:
                self._state = predictor.init_state(view.video, axes=view.axes)
            except Exception as exc:
                raise AnnotatorError(f"could not read image '{view.name}': {exc}") from exc
            self._state_view, self._state_generation = view, generation
            with self._lock:
                self._dirty = True  # a new session: every prompt goes to it
        return predictor, self._state

    def _close_state(self) -> None:
        if self._state is not None and self._predictor is not None:
            self._predictor.close(self._state)
        self._state = self._state_view = None
        self._applied = {}
        self._presence.clear()
        self.parents = {}

    def _emit(self, t: int, labels: np.ndarray) -> None:
        self._presence.update(t, labels)
        self._tell("show_frame", int(t), labels)

    def _post_objects(self, force: bool = True) -> None:
        now = time.monotonic()
        if self._state is None or (not force and now - self._objects_posted < OBJECTS_EVERY_S):
            return
        self._objects_posted = now
        state = self._state
        rows = self._presence.rows(state.obj_ids, {o: state.object_score_logits(o) for o in state.obj_ids},
                                   self.parents)
        self._tell("show_objects", rows)

    # ---------------------------------------------------------------- prompts
    def _pending_prompts(self) -> dict[tuple[int, int], FramePrompt] | None:
        """The prompts to apply (layers + masks) when they changed since the last look, else None."""
        with self._lock:
            if not self._dirty or self.generation != self._state_generation:
                return None
            self._dirty = False
            prompts = {k: FramePrompt(list(v.points), list(v.positive), v.box) for k, v in self._layer_prompts.items()}
            masks = dict(self._masks)
        for key, mask in masks.items():
            entry = prompts.setdefault(key, FramePrompt())
            entry.mask, entry.mask_digest = mask, mask_digest(mask)
        return prompts

    def _new_prompts(self) -> bool:
        """Whether prompts wait to be applied; a task on a video no longer shown stops here."""
        if self.generation != self._state_generation:
            raise Cancelled("the image in view changed")
        return self._dirty

    def _apply_task(self, task: Task) -> None:
        self._ensure_state(task)
        self._apply_prompts(task)

    def _apply_prompts(self, task: Task) -> None:
        """Send new, changed and removed prompts to the predictor; show their frames at once."""
        prompts = self._pending_prompts()
        if prompts is None:
            return
        predictor, state, view = self._predictor, self._state, self._state_view
        changed, removed = diff_prompts(self._applied, prompts)
        outputs: dict[int, Any] = {}
        gone = []
        for t, obj in removed:
            self._applied.pop((t, obj), None)
            if obj not in state.obj_ids:
                continue
            if any(o == obj for (_, o) in prompts):
                outputs[t] = predictor.clear_all_prompts_in_frame(state, t, obj)
            else:
                predictor.remove_object(state, obj)
                self._presence.drop(obj)
                gone.append(obj)
        if gone:
            self._tell("erase_objects", gone)
        for t, obj in changed:
            entry = prompts[(t, obj)]
            if not state.features.ready(t):
                self._say(f"encoding frame {t} ...")
            try:
                outputs[t] = self._send(predictor, state, view, t, obj, entry)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad prompt must not lose the others
                self._say(f"the prompt for object {obj} on frame {t} was not used: {exc}")
                continue
            self._applied[(t, obj)] = entry.signature()
        for t, out in sorted(outputs.items()):
            if out is not None:
                _, ids, logits = out
                self._emit(t, logits_to_labels(logits, ids))
        if outputs:
            self._say(f"mask{'s' if len(outputs) > 1 else ''} of frame{'s' if len(outputs) > 1 else ''} "
                      f"{', '.join(map(str, sorted(outputs)))} updated")
        self._post_objects()

    @staticmethod
    def _send(predictor, state, view: StackView, t: int, obj: int, entry: FramePrompt):
        out = None
        if entry.mask is not None:  # the mask first: clicks then refine it, as in SAM2
            out = predictor.add_new_mask(state, frame_idx=t, obj_id=obj, mask=entry.mask)
        if entry.has_clicks:
            xy, labels = entry.xy_points(view.height, view.width)
            box = entry.xyxy_box(view.height, view.width)
            out = predictor.add_new_points_or_box(state, frame_idx=t, obj_id=obj, points=xy, labels=labels, box=box,
                                                  clear_old_points=entry.mask is None)
        return out

    # ---------------------------------------------------------------- propagation
    def _propagate(self, task: Task, direction: str, lo: int, hi: int | None, lineage: LineageOptions | None) -> None:
        predictor, state = self._ensure_state(task)
        self._apply_prompts(task)
        if not state.obj_ids:
            raise AnnotatorError("no prompt yet: click an object in 'SAM2 points' (or draw a box, or paint a mask "
                                 "and use it as a prompt) first.")
        n = state.num_frames
        hi = n - 1 if hi is None else int(hi)
        lo, hi = max(0, min(int(lo), hi)), min(n - 1, max(int(lo), hi))
        lineage = lineage if lineage is not None and lineage.on else None
        if lineage is not None and direction == "backward":
            raise AnnotatorError("new cells and divisions are found while propagating forward: choose 'forward' or 'both'.")
        prompted = sorted({t for (t, _) in self._applied})
        passes = plan_passes(direction, prompted, lo, hi, backward_first=lineage is not None)
        task.advance(0, sum(p.frames for p in passes))
        self._say(f"propagating {direction} over frames {lo}..{hi}")
        for p in passes:
            if lineage is not None and not p.reverse:
                self._lineage_pass(task, p.start, lineage)
            else:
                self._pass(task, p.start, p.count, p.reverse)
        self._post_objects()
        self._say(f"{task.done} frames written")

    def _pass(self, task: Task, start: int, count: int, reverse: bool) -> None:
        """One pass; new prompts stop it after the frame in flight, and it goes on with them."""
        predictor, state = self._predictor, self._state
        step = -1 if reverse else 1
        skip = None  # a frame tracked again only to go on from it: not shown twice
        while count >= 0:
            frames = predictor.propagate_in_video(state, start_frame_idx=start, max_frame_num_to_track=count,
                                                  reverse=reverse)
            stopped_at = None
            try:
                for t, ids, logits in frames:
                    if t == skip:
                        skip = None
                        continue
                    self._emit(t, logits_to_labels(logits, ids))
                    self._post_objects(force=False)
                    task.advance()
                    if self._new_prompts():
                        stopped_at = t
                        break
            finally:
                frames.close()
            if stopped_at is None:
                return
            self._apply_prompts(task)
            count -= abs(stopped_at - start) + 1
            start = stopped_at + step
            if reverse and start == 0 and count >= 0:
                # a backward pass that starts at frame 0 tracks nothing (as SAM2's): go on from frame 1
                start, count, skip = stopped_at, count + 1, stopped_at

    def _lineage_pass(self, task: Task, start: int, options: LineageOptions) -> None:
        from ..api import open_video
        from ..lineage import LineageTracker, division_params, new_object_params

        predictor, state, view = self._predictor, self._state, self._state_view
        video, _ = open_video(view.video, axes=view.axes)
        tracker = LineageTracker(predictor, state, video, list(state.obj_ids), new_object_params(options.new_every),
                                 division_params(options.divisions), rgb=view.rgb, lost_after=options.lost_after)

        class Interrupt(Exception):
            pass

        def emit(t, frame):
            self._emit(t, frame)
            self.parents.update(tracker.parents)
            self._post_objects(force=False)
            task.advance()
            if self._new_prompts():
                raise Interrupt(t)

        while True:
            try:
                tracker.propagate(start, emit)
                break
            except Interrupt as stop:
                self._apply_prompts(task)
                tracker.adopt(state.obj_ids)
                start = int(stop.args[0]) + 1
                if start >= state.num_frames:
                    break
        self.parents.update(tracker.parents)

    # ---------------------------------------------------------------- the other tasks
    def _precompute(self, task: Task, lo: int, hi: int | None) -> None:
        predictor, state = self._ensure_state(task)
        if getattr(predictor, "feature_cache", None) is None:
            raise AnnotatorError("the feature cache is off ($NAPARI_SAM2_FEATURES=off): there is nowhere to keep the "
                                 "frames' features. Unset it, or set it to a folder.")
        n = state.num_frames
        hi = n - 1 if hi is None else min(int(hi), n - 1)
        frames = list(range(max(0, int(lo)), hi + 1))
        if not frames:
            raise AnnotatorError(f"frames {lo}..{hi} are outside the video (frames 0..{n - 1})")
        task.advance(0, len(frames))
        self._say(f"encoding frames {frames[0]}..{frames[-1]} into the feature cache")

        def progress(steps):
            task.advance(steps)
            if self._new_prompts():  # a click during precompute is answered between two frames
                self._apply_prompts(task)

        encoded = predictor.precompute(state, frames, progress=progress)
        self._say(f"{len(frames)} frames ready ({encoded} encoded now, {len(frames) - encoded} were cached): "
                  "a click on any of them runs the decoder alone")

    def _segment_all(self, task: Task, t: int, auto: dict | None, frame_labels: np.ndarray | None) -> None:
        from ..predictor.seeding import FrameSeeder

        predictor, state = self._ensure_state(task)
        self._apply_prompts(task)
        view = self._state_view
        if not 0 <= t < state.num_frames:
            raise AnnotatorError(f"frame {t} is outside the video (frames 0..{state.num_frames - 1})")
        self._say(f"finding cells on frame {t} ...")
        masks = FrameSeeder(predictor.model, auto, state.intensity_range, rgb=view.rgb)(view.video[t])
        task.check()
        if frame_labels is not None:  # cells already labelled are not new objects
            taken = frame_labels > 0
            masks = [m for m in masks if (m & taken).sum() <= 0.5 * m.sum()]
        with self._lock:
            used = {o for (_, o) in self._masks} | {o for (_, o) in self._layer_prompts}
        first = max([0, *state.obj_ids, *used]) + 1
        with self._lock:
            for i, mask in enumerate(masks):
                self._masks[(t, first + i)] = mask
            self._dirty = True
        self._apply_prompts(task)
        self._say(f"frame {t}: {len(masks)} new object{'s' if len(masks) != 1 else ''}"
                  + (f" (ids {first}..{first + len(masks) - 1})" if masks else
                     ": the generator found no new cell (try more points per side)"))

    def _remove(self, task: Task, obj_ids: list[int] | None) -> None:
        if self._state is not None:
            self._apply_prompts(task)
            state = self._state
            for obj in list(state.obj_ids) if obj_ids is None else obj_ids:
                if obj in state.obj_ids:
                    self._predictor.remove_object(state, obj)
                self._presence.drop(obj)
                self.parents.pop(obj, None)
            self._applied = {k: v for k, v in self._applied.items() if obj_ids is not None and k[1] not in obj_ids}
            if obj_ids is None:
                self._presence.clear()
                self.parents = {}
        self._tell("erase_objects", obj_ids)
        self._post_objects()

    def _train(self, task: Task, choice: ModelChoice, view: StackView, labels, request) -> None:
        from .finetuning import run_training

        def between_steps():  # a click while it trains is answered by the model the session has
            if self._state is not None:
                self._apply_prompts(task)

        self._say(f"fine-tuning {choice.model} on {view.describe()} for {request.steps} steps ...")
        summary = run_training(task, choice, view, labels, request, between_steps)
        self.last_training = summary
        new = dataclasses.replace(choice, checkpoint=str(summary.checkpoint))
        with self._lock:
            switched = self.choice == choice
            if switched:
                self.choice = new
        if switched:
            parents = dict(self.parents)  # the lineage found so far holds for the labels whatever the weights
            self._ensure_predictor(task)  # loaded now: the next click runs the fine-tuned weights at once
            self.parents.update(parents)
        text = summary.describe(choice.model if switched else None)
        listener, checkpoint = self.listener, new.checkpoint if switched else None

        def tell():
            trained = getattr(listener, "model_trained", None)
            if trained is not None:
                trained(checkpoint, text)
            else:
                listener.show_status(text)

        self._post_current(tell)

    def _export(self, task: Task, path, fmt: str | None, video: np.ndarray, parents: dict[int, int]) -> None:
        from pathlib import Path

        from ..label_formats import format_of_path, label_format, write_labels
        from ..tracking import add_parents, ctc_tracks, tracks_table

        fmt = label_format(fmt) if fmt else format_of_path(path)
        tracks = ctc_tracks(add_parents(tracks_table(video), parents)) if fmt in ("ctc", "geff") else None
        try:
            out = write_labels(Path(path), video, fmt, tracks=tracks, overwrite=True)
        except Exception as exc:
            raise AnnotatorError(f"could not export to '{path}': {exc}") from exc
        self._say(f"exported {out}")


def _build_predictor(choice: ModelChoice, report: Callable[[int, int | None], None]):
    """The video predictor of ``choice``, its weights downloaded (with ``report``) when missing."""
    from ..build import build_model, resolve_device
    from ..checkpoints import resolve_checkpoint
    from ..predictor.video import VideoPredictor

    try:
        device = resolve_device(choice.device)
    except Exception as exc:
        raise AnnotatorError(f"device '{choice.device}' cannot be used: {exc}") from exc
    what = f"'{choice.checkpoint}'" if choice.checkpoint else f"the {choice.model} weights"
    try:
        path = resolve_checkpoint(choice.model, choice.checkpoint, report=report)
        model = build_model(choice.model, checkpoint=path, device=device, image_size=choice.image_size,
                            precision=choice.precision)
    except Cancelled:
        raise
    except Exception as exc:  # bad file, wrong model, no network, no CUDA...
        reason = str(exc).strip() or type(exc).__name__
        raise AnnotatorError(f"could not load {what}: {reason}; choose the checkpoint of {choice.model} "
                             "or another model") from exc
    return VideoPredictor(model, add_all_frames_to_correct_as_cond=True)
