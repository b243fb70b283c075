# %% [markdown]
# # Fine-tuning SAM2 on an annotated stack, then segmenting with it
#
# A notebook as a script: run it top to bottom (`python examples/finetune.py [WORKDIR]`) or cell by
# cell (`# %%` cells open as a notebook in VS Code, or with `jupytext --to notebook`). See
# [docs/training.md](../docs/training.md) for what each option does.
#
# It makes a synthetic annotated 16-bit time-lapse (moving, dividing cells and their label masks),
# saves it as an image / labels TIFF pair, fine-tunes `sam2.1_hiera_tiny` on it for a few steps at a
# small input size with `napari_sam2.finetune` (validated on another stack), prints the history and
# the validation scores, and segments a new stack with the fine-tuned checkpoint through
# `napari_sam2.segment_stack(..., model=..., checkpoint=...)`.
#
# Base weights: the official checkpoint when it is already on this machine (`napari-sam2 download
# sam2.1_hiera_tiny` fetches it; `--download` here does the same), else seeded random weights in the
# official layout (demo mode: everything runs, offline, but the scores mean nothing). A few steps
# on a CPU take a minute or two; real fine-tuning runs hundreds of steps (`STEPS`) at 512-1024.

# %%
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

import napari_sam2
from napari_sam2.checkpoints import CheckpointError, resolve_checkpoint
from napari_sam2.synthetic import make_timelapse
from napari_sam2.train.loop import output_paths

WORK = Path(next((a for a in sys.argv[1:] if not a.startswith("-")), "finetune_output"))
WORK.mkdir(exist_ok=True)
MODEL = "sam2.1_hiera_tiny"
DEVICE = "auto"  # cuda > mps > cpu
SIZE = 256  # network input size: 1024 is SAM2's own; 256-512 is much faster on a CPU
STEPS = 6  # optimiser steps, one clip each
FRAMES = 4  # frames per training clip (SAM2 trains with 8)

# %% [markdown]
# ## Annotated data: an image stack and its label stack, on disk
#
# Labels are integer images of the same `(T, Y, X)` shape as the movie, 0 = background, one id per
# cell kept over time (a track). Every label frame is taken as complete. The same data could be
# given as arrays, `(movie, labels)`, or as a Cell Tracking Challenge folder.

# %%
train = make_timelapse(n_frames=12, shape=(192, 192), n_cells=5, seed=1)
movie, labels = WORK / "movie.tif", WORK / "movie_labels.tif"
tifffile.imwrite(movie, train.image, imagej=True, metadata={"axes": "TYX"})
tifffile.imwrite(labels, train.labels)
held_out = make_timelapse(n_frames=8, shape=(192, 192), n_cells=4, seed=2)  # validation: not trained on
print(movie, train.image.shape, train.image.dtype, "|", labels, train.labels.dtype, "cells:", len(train.lineage))

# %% [markdown]
# ## Base weights
#
# The official checkpoint if it is already downloaded (or `--download`), else random weights saved
# in the official layout `{"model": state_dict}`, exactly what a fine-tuned checkpoint looks like.

# %%
try:
    base = resolve_checkpoint(MODEL, download="--download" in sys.argv)
    DEMO = False
    print(f"base weights: {base}")
except CheckpointError as exc:
    print(f"{exc}\nDEMO MODE: random weights; the run works end to end, the scores mean nothing.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = napari_sam2.build_model(MODEL, pretrained=False, image_size=SIZE, precision="fp32")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g) * 0.02)
        net.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(2.0)  # objects "present"
    base = WORK / "random_base.pt"
    torch.save({"model": net.state_dict()}, base)
    DEMO = True

# %% [markdown]
# ## Fine-tune
#
# The CLI equivalent:
#
# ```bash
# napari-sam2 train finetune_output/movie.tif::finetune_output/movie_labels.tif --out finetune_output/mine.pt \
#     --model sam2.1_hiera_tiny --steps 6 --image-size 256 --num-frames 4
# ```
#
# The image encoder stays frozen (the default); `lora=8` would train LoRA adapters instead,
# `freeze_encoder=False` everything. A run refuses to overwrite an earlier run's state: this
# example starts over each time, so it removes the outputs of its last run first.

# %%
out = WORK / "mine.pt"
for path in output_paths(out).values():
    path.unlink(missing_ok=True)
history = napari_sam2.finetune(
    f"{movie}::{labels}",
    out,
    model=MODEL,
    checkpoint=base,
    val=(held_out.image, held_out.labels),
    steps=STEPS,
    image_size=SIZE,
    num_frames=FRAMES,
    val_every=3,
    device=DEVICE,
    seed=0,
)
print(f"checkpoint {history.checkpoint}\nlog {history.log_csv}, curves {history.plot}, state {history.state}")

# %% [markdown]
# ## History and validation
#
# One row per optimiser step: the loss and its four terms (mask focal, dice, IoU, object score),
# the learning rate and the step's seconds; validation rows add J (region IoU), F (boundary
# F-measure) and J&F on the held-out stack, tracked from its first frame's masks (`_mask`) and from
# one click per cell (`_click`). Row 0 holds the scores of the base weights, before training.

# %%
table = pd.DataFrame(history.rows).set_index("step")
print(table.to_string(float_format="{:.4g}".format, na_rep=""))
scores = [r for r in history.rows if "val_JF_mask" in r]
for r in (scores[0], scores[-1]) if len(scores) > 1 else scores:
    print(f"step {r['step']:>3}: J&F {r['val_JF_mask']:.3f} from a mask, {r['val_JF_click']:.3f} from a click")

# %% [markdown]
# ## Segment a new stack with the fine-tuned checkpoint
#
# A fine-tuned checkpoint loads with its base model's name; segment at the input size it was
# trained at (the checkpoint does not record it). Here: one click per cell on frame 0.

# %%
new = make_timelapse(n_frames=6, shape=(192, 192), n_cells=4, divide=False, seed=5)
clicks = new.clicks(0)


def mean_iou(pred, truth, ids) -> float:
    """Mean IoU over cells and frames where the cell is in the ground truth."""
    found = [((truth[t] == i) & (pred[t] == i)).sum() / ((truth[t] == i) | (pred[t] == i)).sum()
             for t in range(truth.shape[0]) for i in ids if (truth[t] == i).any()]
    return float(np.mean(found)) if found else float("nan")


for name, weights in (("base", base), ("fine-tuned", out)):
    result = napari_sam2.segment_stack(new.image, points=clicks, model=MODEL, checkpoint=weights,
                                       image_size=SIZE, device=DEVICE, progress=False)
    iou = mean_iou(np.asarray(result.labels), new.labels, clicks.obj_id.tolist())
    print(f"{name:>10}: {result.n_objects} objects over {new.n_frames} frames, mean IoU {iou:.3f}")
if DEMO:
    print("(demo mode: random base weights, the IoUs mean nothing)")
