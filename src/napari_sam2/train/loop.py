"""``finetune``: the training loop, its outputs and its resumable state.

Outputs, all beside ``out`` (e.g. ``my_cells.pt``):

- ``my_cells.pt``: the fine-tuned weights in the official layout ``{"model": state_dict}`` (LoRA merged
  in), loadable by ``build_model(name, checkpoint=...)``, the CLI, the widget and the reference's
  ``build_sam2``;
- ``my_cells.train.pt``: the resumable state (weights as trained, optimiser, step, random generators,
  settings, history), written every ``save_every`` steps, on Ctrl-C and at the end;
- ``my_cells.csv``: one row per step (losses, learning rate) with the validation scores where measured;
- ``my_cells.png``: loss and validation curves.

Every file is written to a temporary sibling and renamed, so an interrupted run never leaves a
half-written file, and an input is never overwritten.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..build import build_model, resolve_device
from ..io.atomic import atomic_path
from ..precision import resolve_precision
from .data import Clip, ClipSampler, TrainingDataError, clip_from_frames, open_training_data, spec_list
from .forward import clip_features, track_clip
from .loss import LOSS_NAMES, clip_loss
from .optim import build_optimizer, clip_gradients, set_learning_rates
from .prompts import DEFAULT_PROMPTS, PromptSettings, error_click, plan_prompts
from .validate import ValidationFeatures, validate

log = logging.getLogger("napari_sam2")

STATE_VERSION = 1
MAX_DEFAULT_VAL = 16  # training sequences validated on when no validation data is given


class TrainingError(ValueError):
    """Bad training options or outputs, raised before any training step."""


class TrainingCancelled(RuntimeError):
    """Training stopped on request; the resumable state was saved."""


@dataclass
class TrainingHistory:
    """What a run did: one row per optimiser step, validation scores where measured."""

    rows: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    state: Path | None = None
    log_csv: Path | None = None
    plot: Path | None = None

    @property
    def steps(self) -> list[dict]:
        """The rows of optimiser steps (the first row, step 0, holds only the scores before training)."""
        return [r for r in self.rows if "loss" in r]

    def validation(self) -> list[dict]:
        return [r for r in self.rows if any(k.startswith("val_") for k in r)]

    @property
    def last_validation(self) -> dict:
        rows = self.validation()
        return rows[-1] if rows else {}


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    if out.suffix != ".pt":
        out = out.with_name(out.name + ".pt")
    stem = out.with_suffix("")
    return {"checkpoint": out, "state": Path(f"{stem}.train.pt"), "csv": Path(f"{stem}.csv"), "plot": Path(f"{stem}.png")}


def _check_outputs(paths: dict[str, Path], data_specs: Sequence, checkpoint) -> None:
    folder = paths["checkpoint"].parent
    if not folder.is_dir():
        raise TrainingError(f"the output folder {folder} does not exist: create it or choose another --out.")
    probe = folder / f".napari-sam2-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"cannot write to the output folder {folder} ({exc.strerror}): choose another --out.") from None
    inputs = [Path(str(s).split("::")[0]) for s in data_specs if isinstance(s, (str, os.PathLike))]
    inputs += [Path(str(s).split("::")[-1]) for s in data_specs if isinstance(s, (str, os.PathLike))]
    if checkpoint is not None:
        inputs.append(Path(checkpoint))
    for p in paths.values():
        for src in inputs:
            with contextlib.suppress(OSError):
                if src.exists() and (p.resolve() == src.resolve() or src.resolve() in p.resolve().parents):
                    raise TrainingError(f"the output {p} would overwrite the input {src}: choose another --out.")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to the project's hidden temporary sibling, then rename it over ``path``."""
    with atomic_path(path, overwrite=True) as tmp:
        write(tmp)


def _atomic_save(obj, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def write_log(rows: list[dict], path: Path) -> None:
    keys = ["step", "loss", *LOSS_NAMES, "lr", "seconds"]
    keys += sorted({k for r in rows for k in r if k.startswith("val_")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic(path, lambda tmp: tmp.write_text(buf.getvalue()))


def plot_history(rows: list[dict], path: Path, title: str) -> None:
    # a bare Figure needs no backend: pyplot's (the user's, in napari) is left alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax_loss, ax_val = fig.subplots(1, 2)
    trained = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in trained]
    ax_loss.plot(steps, [r["loss"] for r in trained], lw=0.8, label="loss")
    if len(trained) >= 10:
        k = max(len(trained) // 20, 2)
        smooth = np.convolve([r["loss"] for r in trained], np.ones(k) / k, mode="valid")
        ax_loss.plot(steps[k - 1 :], smooth, lw=1.6, label=f"mean of {k}")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax_loss.legend(fontsize=8)
    val = [r for r in rows if "val_JF_mask" in r]
    for key, label in (("val_JF_mask", "J&F from a mask"), ("val_JF_click", "J&F from a click"),
                       ("val_J_mask", "J from a mask"), ("val_J_click", "J from a click")):
        if val and key in val[0]:
            ax_val.plot([r["step"] for r in val], [r[key] for r in val], marker="o", ms=3, label=label)
    ax_val.set(xlabel="step", ylabel="validation score", ylim=(0, 1), title="validation (frame 0 prompted)")
    if val:
        ax_val.legend(fontsize=8)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))  # the temporary has no .png suffix


def validation_clips(sequences, image_size: int, num_frames: int, max_objects: int = 10) -> list[Clip]:
    """One fixed clip per sequence: its first frame with objects and the frames after it."""
    clips = []
    for seq in sequences:
        for start in range(seq.num_frames):
            ids = [int(i) for i in np.unique(np.asarray(seq.labels[start])) if i != 0][:max_objects]
            if ids:
                frames = list(range(start, min(start + num_frames, seq.num_frames)))
                clips.append(clip_from_frames(seq, frames, ids, image_size))
                break
    return clips


def _plain(value):
    """A value the resumable state can hold under ``torch.load(weights_only=True)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _settings_record(**kw) -> dict:
    return {k: _plain(v) for k, v in kw.items()}


def finetune(
    data,
    out: str | os.PathLike,
    *,
    model: str = "sam2.1_hiera_tiny",
    checkpoint: str | os.PathLike | None = None,
    val=None,
    steps: int | None = None,
    epochs: float | None = None,
    image_size: int | None = None,
    freeze_encoder: bool | None = None,
    lora: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    resume: bool = False,
    lr: float = 5e-6,
    vision_lr: float | None = None,
    weight_decay: float = 0.1,
    layer_decay: float = 0.9,
    grad_clip: float = 0.1,
    accumulate: int = 1,
    num_frames: int = 8,
    max_num_objects: int = 3,
    augment: bool = True,
    val_every: int | None = None,
    save_every: int | None = None,
    seed: int = 0,
    axes: str | None = None,
    prompts: PromptSettings = DEFAULT_PROMPTS,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
) -> TrainingHistory:
    """Fine-tune a SAM2 model on annotated stacks with the SAM2 training recipe.

    Parameters
    ----------
    data
        Training data: CTC dataset or sequence folders, ``"IMAGE::LABELS"`` pairs (TIFF, Zarr, OME-Zarr,
        or folders of them), ``(images, labels)`` arrays; see :func:`napari_sam2.train.data.open_training_data`.
    out
        The fine-tuned checkpoint (``.pt``); the state, log and plot are written beside it.
    model, checkpoint
        The base model's name and its weights (default: the official checkpoint, downloaded once).
    val
        Validation data (same forms as ``data``); default: a fixed clip of each training sequence.
    steps, epochs
        Length of the run in optimiser steps, or in epochs (one clip per start position of each
        sequence). Default: 1 epoch.
    image_size
        Network input size (default: the model's 1024; 256-512 is much faster on a CPU).
    freeze_encoder
        Keep the image encoder fixed (default: True, the choice for small datasets, unless ``lora``).
    lora
        Rank of LoRA adapters on the attention projections (``peft``): only they (and nothing of the
        base) are trained, and they are merged into the saved weights.
    precision
        ``"auto"``: bf16 autocast where the hardware computes bf16 natively, as the reference trains.
    resume
        Continue the run whose state lies beside ``out`` (same data and options).
    accumulate
        Clips per optimiser step (gradient accumulation).
    val_every, save_every
        Validate / save the resumable state every N steps (default: 10 times per run).
    axes
        Axes of the image files when their metadata does not say (e.g. ``"TYX"`` for a 3- or 4-frame TIFF,
        which would otherwise read as channels).
    on_step, cancel
        A callback with each step's row; an event that stops training (state saved).

    Returns the :class:`TrainingHistory`.
    """
    paths = output_paths(out)
    specs = spec_list(data)
    val_specs = spec_list(val) if val is not None else []
    _check_outputs(paths, specs + val_specs, checkpoint)
    if lora is not None and lora <= 0:
        raise TrainingError(f"lora must be a positive rank (e.g. 8), got {lora}.")
    if accumulate < 1:
        raise TrainingError(f"accumulate must be >= 1, got {accumulate}.")
    sequences = open_training_data(specs, axes=axes)
    val_sequences = open_training_data(val_specs, axes=axes) if val_specs else sequences

    dev = resolve_device(device)
    net = build_model(model, checkpoint=checkpoint, device=dev, image_size=image_size, precision="fp32")
    size = net.image_size
    sampler = ClipSampler(sequences, size, num_frames=num_frames, max_num_objects=max_num_objects, augment=augment)
    if len(sampler) == 0:
        raise TrainingDataError("no frame of the training data has a labelled object: nothing to train on.")
    if steps is None:
        steps = max(1, math.ceil((epochs if epochs is not None else 1.0) * len(sampler) / accumulate))
    if steps < 1:
        raise TrainingError(f"steps must be >= 1, got {steps}.")
    val_every = val_every or max(1, steps // 10)
    save_every = save_every or val_every
    freeze_encoder = (lora is None) if freeze_encoder is None else freeze_encoder
    # with LoRA, "not frozen" means the encoder's attention gets adapters (its weights stay fixed)
    settings = _settings_record(model=model, image_size=size, lora=lora, freeze_encoder=freeze_encoder,
                                num_frames=num_frames, max_num_objects=max_num_objects, accumulate=accumulate,
                                lr=lr, vision_lr=vision_lr, weight_decay=weight_decay, layer_decay=layer_decay,
                                grad_clip=grad_clip, augment=augment, seed=seed, steps=steps,
                                prompts=prompts,
                                data=[s.name for s in sequences], val=[s.name for s in val_sequences])

    train_encoder = True
    if lora is not None:
        from .lora import add_lora

        # adapters in the encoder too, unless it was asked to stay frozen
        net = add_lora(net, rank=lora, exclude=("image_encoder",) if freeze_encoder is True else ())
        train_encoder = any(p.requires_grad for n, p in net.named_parameters() if "image_encoder" in n)
    elif freeze_encoder:
        for p in net.image_encoder.parameters():
            p.requires_grad_(False)
        train_encoder = False
    optimizer = build_optimizer(net, lr=lr, vision_lr=vision_lr, weight_decay=weight_decay, layer_decay=layer_decay)
    trainable = [p for p in net.parameters() if p.requires_grad]

    rng = np.random.default_rng(seed)
    clicks = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    history = TrainingHistory(checkpoint=paths["checkpoint"], state=paths["state"], log_csv=paths["csv"], plot=paths["plot"])
    start = 0
    if resume:
        start = _restore(paths["state"], settings, net, optimizer, rng, clicks, history)
    elif paths["state"].exists():
        raise TrainingError(
            f"{paths['state']} holds an earlier run: pass --resume (resume=True) to continue it, or delete it "
            "(or choose another --out) to start over."
        )
    if val is None and len(val_sequences) > MAX_DEFAULT_VAL:
        # a folder of many single images would hold (and track) a clip per image at every validation
        pick = np.linspace(0, len(val_sequences) - 1, MAX_DEFAULT_VAL).round().astype(int)
        val_sequences = [val_sequences[i] for i in pick]
    val_clips = validation_clips(val_sequences, size, num_frames)
    val_features = ValidationFeatures(keep=not train_encoder)  # a fixed encoder gives them the same features
    autocast = _autocast(precision, dev)
    log.info("fine-tuning %s at %d px on %s (%s): %d steps, %d trainable parameters, %s",
             model, size, dev, "bf16 autocast" if autocast else "fp32", steps, sum(p.numel() for p in trainable),
             f"LoRA rank {lora}" if lora else ("image encoder frozen" if freeze_encoder else "full fine-tuning"))

    def save_state(step: int) -> None:
        _atomic_save({
            "version": STATE_VERSION, "settings": settings, "step": step, "model": net.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state, "clicks": clicks.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history.rows,
        }, paths["state"])
        write_log(history.rows, paths["csv"])

    if not history.rows:
        # the scores before training: what fine-tuning is measured against
        history.rows.append({"step": 0, **validate(net, val_clips, dev, val_features)})
    bar = _progress(progress, steps, start)
    net.train()
    try:
        for step in range(start, steps):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"training cancelled at step {step} of {steps}")
            t0 = time.perf_counter()
            set_learning_rates(optimizer, step, steps)
            totals = dict.fromkeys(["loss", *LOSS_NAMES], 0.0)
            for _ in range(accumulate):
                clip = sampler.sample(rng)
                images, gt = clip.images.to(dev), clip.masks.to(dev)
                with autocast or contextlib.nullcontext():
                    feats = clip_features(net, images, train_encoder)
                    plan = plan_prompts(gt, rng, clicks, prompts)
                    outs = track_clip(net, feats, gt, plan, rng, lambda g, p: error_click(g, p, clicks), prompts)
                    losses = clip_loss(outs, gt)
                if losses["loss"].requires_grad:  # a clip of mask-prompted frames only has nothing to learn
                    (losses["loss"] / accumulate).backward()
                for k in totals:
                    totals[k] += float(losses[k].detach()) / accumulate
            clip_gradients(trainable, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, **totals, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.rows.append(row)  # before validating: an interrupt from here on keeps this step's update
            if (step + 1) % val_every == 0 or step + 1 == steps:
                row.update(validate(net, val_clips, dev, val_features))
            if bar is not None:
                bar.update(1)
                recent = [r["loss"] for r in history.steps[-10:]]  # a running mean: one clip's loss jumps
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}",
                                **({"J&F": f"{row['val_JF_mask']:.2f}"} if "val_JF_mask" in row else {}))
            if on_step is not None:
                on_step(row)
            if (step + 1) % save_every == 0 and step + 1 < steps:
                save_state(step + 1)
    except BaseException:  # Ctrl-C, cancel, or an error raised by on_step: the steps done are kept
        save_state(history.rows[-1]["step"])
        raise
    finally:
        if bar is not None:
            bar.close()
    save_state(steps)
    _save_checkpoint(net, lora, paths["checkpoint"])
    plot_history(history.rows, paths["plot"], f"{model} fine-tuning")
    return history


def _autocast(precision: str, device: torch.device):
    chosen, _ = resolve_precision(precision, device)
    if chosen != "bf16":
        return None
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fine-tune", unit="step")


def _save_checkpoint(net, lora, path: Path) -> None:
    if lora is not None:
        from .lora import merge_lora

        net = merge_lora(net)
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    _atomic_save({"model": sd}, path)


def _restore(path: Path, settings: dict, net, optimizer, rng, clicks, history) -> int:
    if not path.exists():
        raise TrainingError(f"nothing to resume: {path} does not exist (run without --resume to start).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} is a training state of another version ({state.get('version')}).")
    old = state["settings"]
    differ = {k: (old.get(k), v) for k, v in settings.items() if k != "steps" and old.get(k) != v}
    if differ:
        what = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise TrainingError(f"cannot resume {path} with other options ({what}): use the same options, or start over.")
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    clicks.set_state(state["clicks"])
    torch.set_rng_state(state["torch_rng"])
    history.rows[:] = state["history"]
    return int(state["step"])

