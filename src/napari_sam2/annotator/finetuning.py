"""Fine-tuning from the annotator: the session's video and its corrected masklets in, a checkpoint out.

SAM2's data engine in a viewer: annotate with SAM2, correct the masklets, fine-tune on them, and go
on annotating with the fine-tuned weights. :func:`check_request` runs in the GUI thread and only looks
at shapes and paths; :func:`run_training` runs in the worker, where it reads the labels and calls
:func:`napari_sam2.train.loop.finetune`, which builds a network of its own from the checkpoint (the
predictor the session tracks with is never touched by training).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .choices import AnnotatorError, ModelChoice
from .stack_view import StackView
from .tasks import Cancelled, Task

__all__ = ["TrainingRequest", "TrainingSummary", "check_request", "run_training"]

RUNNING_MEAN = 10  # the loss shown is the mean of the last steps': one step's loss jumps with its clip


@dataclass(frozen=True)
class TrainingRequest:
    """What to train: the output checkpoint, the length of the run and finetune's other options."""

    out: Path
    steps: int
    image_size: int
    lora: int | None = None
    num_frames: int = 8
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSummary:
    checkpoint: Path
    steps: int
    loss: float
    jf: float | None  # J&F on the validation clip, prompted with the first frame's masks

    def describe(self, now_using: str | None) -> str:
        text = f"fine-tuned {self.steps} step{'s' if self.steps != 1 else ''}: last loss {self.loss:.4f}"
        if self.jf is not None:
            text += f", validation J&F {self.jf:.3f}"
        if now_using is None:  # another model was chosen while it trained: that choice stands
            return f"{text}; saved {self.checkpoint} (the model chosen meanwhile stays in use)"
        return f"{text}; {now_using} now runs {self.checkpoint}"


def check_request(view: StackView | None, choice: ModelChoice | None, labels, out, steps: int,
                  image_size: int | None, lora: int | None, num_frames: int, options: dict):
    """The ``(T, Y, X)`` labels (not read) and the request, or :class:`AnnotatorError` saying what to fix.

    Only shapes and file names are looked at: the GUI thread must not read a large labels layer."""
    from ..train.loop import finetune, output_paths

    if view is None:
        raise AnnotatorError("no image to fine-tune on: choose the image layer the labels belong to as 'Image'.")
    if choice is None:
        raise AnnotatorError("no model chosen")
    if labels is None or not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        raise AnnotatorError("no labels to fine-tune on: choose a Labels layer (e.g. 'SAM2 masklets').")
    video_shape = (view.n_frames, view.height, view.width)
    if tuple(labels.shape) == tuple(view.labels_shape):  # the layer made for this image: its slice of the video
        labels = view.labels_video(labels)
    if tuple(labels.shape) != video_shape:
        raise AnnotatorError(f"the labels have shape {tuple(labels.shape)} but the video {view.describe()} has "
                             f"{view.n_frames} frame(s) of {view.height} x {view.width}: choose the labels made "
                             "for this image (e.g. 'SAM2 masklets').")
    if np.dtype(labels.dtype).kind not in "biu":
        raise AnnotatorError(f"the labels have dtype {labels.dtype}: choose a Labels layer (integer labels).")
    if int(steps) < 1:
        raise AnnotatorError(f"steps must be at least 1, got {steps}.")
    if lora is not None and int(lora) < 1:
        raise AnnotatorError(f"the LoRA rank must be at least 1 (or none), got {lora}.")
    if int(num_frames) < 1:
        raise AnnotatorError(f"frames per clip must be at least 1, got {num_frames}.")
    known = set(inspect.signature(finetune).parameters) - {"data", "out", "model", "checkpoint", "device",
                                                           "precision", "progress", "on_step", "cancel", "steps",
                                                           "image_size", "lora", "num_frames"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AnnotatorError(f"unknown fine-tuning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    paths = output_paths(Path(out).expanduser())
    target = paths["checkpoint"]
    if not target.parent.is_dir():
        raise AnnotatorError(f"the folder of the output {target} does not exist: choose another output file.")
    if choice.checkpoint and _same_file(target, Path(choice.checkpoint)):
        raise AnnotatorError(f"{target} is the checkpoint in use, the base of the fine-tuning: choose another "
                             "output file.")
    source = getattr(getattr(getattr(view, "layer", None), "source", None), "path", None)
    clash = [p for p in paths.values() if source and _same_file(p, Path(source))]
    if clash:  # e.g. Output "cells.pt" beside an image opened from "cells.png": the plot would replace it
        raise AnnotatorError(f"fine-tuning would write {clash[0].name} over the image's own file {source}: "
                             "choose another output file.")
    if paths["state"].exists() and not options.get("resume"):  # finetune would refuse it: say it in GUI terms
        raise AnnotatorError(f"{paths['state']} holds an earlier fine-tuning run to {target.name}: choose another "
                             "output file, or delete it to start over.")
    request = TrainingRequest(target, int(steps), int(image_size or choice.image_size),
                              None if lora is None else int(lora), int(num_frames), dict(options))
    return labels, request


def run_training(task: Task, choice: ModelChoice, view: StackView, labels, request: TrainingRequest,
                 between_steps: Callable[[], None] | None = None) -> TrainingSummary:
    """Fine-tune ``choice``'s weights on ``view``'s video and ``labels`` (worker thread).

    Progress is the task's (step / steps, running loss); cancelling the task stops training before its
    next step, the resumable state saved, and raises :class:`Cancelled`. ``between_steps`` runs after
    each step (the session answers clicks there, with the model it has)."""
    from ..checkpoints import CheckpointError, resolve_checkpoint
    from ..io import open_stack
    from ..train.loop import TrainingCancelled, finetune, output_paths

    steps = request.steps
    task.advance(0, steps, message="reading the labels")
    # a snapshot: painting (or a click's mask) while it trains must not change the data under the run
    labels = np.array(labels, copy=True)
    if not labels.any():
        raise AnnotatorError("the labels are empty (every pixel is 0): nothing to train on. Segment and correct "
                             "some cells first (clicks, 'Propagate', painting), then fine-tune.")
    task.check()
    if choice.checkpoint is None:  # official weights: fetched here, with the task's bar, if not cached yet
        try:
            resolve_checkpoint(choice.model, None, report=lambda n, total: task.advance(n, total, "downloading"))
        except CheckpointError as exc:
            raise AnnotatorError(f"could not get the {choice.model} weights to fine-tune: {exc}") from exc
        task.done, task.total = 0, steps
    # train only on the annotated span: frames after the last corrected one would teach the model
    # that every cell vanished there
    video = view.video
    annotated = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    first, last = int(annotated[0]), int(annotated[-1])
    axes = view.axes or ""
    if (first, last) != (0, labels.shape[0] - 1) and "T" in axes and len(axes) == np.ndim(video):
        index = [slice(None)] * len(axes)
        index[axes.index("T")] = slice(first, last + 1)
        video, labels = video[tuple(index)], labels[first : last + 1]
    # the axes the session reads the video with (an RGB movie is TYXC, which a bare array's guess misses)
    images = open_stack(video, axes=view.axes)
    losses: list[float] = []

    def on_step(row: dict) -> None:
        losses.append(float(row["loss"]))
        recent = losses[-RUNNING_MEAN:]
        text = f"step {row['step']}/{steps}, loss {sum(recent) / len(recent):.4f}"
        if "val_JF_mask" in row:
            text += f", J&F {row['val_JF_mask']:.3f}"
        try:
            task.advance(int(row["step"]) - task.done, message=text)
        except Cancelled:
            pass  # finetune sees the same event before its next step, saves its state and stops
        if between_steps is not None:
            between_steps()

    task.advance(0, message=f"preparing {choice.model} at {request.image_size} px")
    try:
        history = finetune(
            [(images, labels)], request.out, model=choice.model, checkpoint=choice.checkpoint, steps=steps,
            image_size=request.image_size, lora=request.lora, num_frames=request.num_frames,
            device=choice.device, precision=choice.precision, progress=False, on_step=on_step,
            cancel=task.cancel_event, **request.options,
        )
    except TrainingCancelled as exc:
        state = output_paths(request.out)["state"]
        task.note = f"{choice.model} keeps its weights (no checkpoint written); the run's state is in {state}"
        raise Cancelled(str(exc)) from exc
    except (ValueError, CheckpointError) as exc:  # TrainingError, TrainingDataError: bad input, said for a user
        message = str(exc).replace("another --out", "another output file")
        raise AnnotatorError(f"fine-tuning failed: {message}") from exc
    last = history.steps[-1]
    jf = history.last_validation.get("val_JF_mask")
    return TrainingSummary(Path(history.checkpoint), int(last["step"]), float(last["loss"]),
                           None if jf is None else float(jf))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.expanduser().resolve()
    except OSError:
        return False
