"""``napari-sam2 train``: the command-line door to :func:`~napari_sam2.train.loop.finetune`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
DATA is a Cell Tracking Challenge dataset folder (01/, 01_GT/SEG or 01_GT/TRA, ...), one CTC sequence
folder (e.g. Fluo-N2DH-GOWT1/01), or an image/labels pair IMAGE::LABELS (TIFF, Zarr, OME-Zarr, or two
folders of them matched by file name). Single annotated images train SAM's interactive task alongside.

Outputs beside --out (e.g. my_cells.pt): my_cells.pt (weights in the official layout: use it with
--checkpoint and the base model's --model everywhere), my_cells.train.pt (resume with --resume),
my_cells.csv (losses, validation J / F / J&F) and my_cells.png (curves).

examples:
  napari-sam2 train Fluo-N2DH-GOWT1 --model sam2.1_hiera_tiny --out gowt1.pt --epochs 2 --image-size 512
  napari-sam2 train movie.tif::movie_labels.tif --out mine.pt --steps 500 --lora 8 --val other.tif::other_labels.tif
  napari-sam2 segment new_movie.tif --prompts clicks.csv --model sam2.1_hiera_tiny --checkpoint mine.pt --out results
"""


def add_parser(sub, add_model_options) -> None:
    tr = sub.add_parser("train", help="fine-tune a model on annotated stacks (SAM2's training recipe)",
                        description="Fine-tune SAM2 on your own annotated time-lapses and images: clips of "
                        "--num-frames frames, prompts simulated as in SAM2's training (masks, clicks, boxes, "
                        "corrective clicks), SAM2's loss, AdamW with layer-wise decay and a cosine schedule.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("data", nargs="+", metavar="DATA", help="training data (see below)")
    tr.add_argument("--out", "-o", required=True, metavar="FILE.pt", help="the fine-tuned checkpoint")
    tr.add_argument("--val", nargs="+", metavar="DATA", help="validation data (default: a fixed clip of each training sequence)")
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="optimiser steps")
    length.add_argument("--epochs", type=float, metavar="N", help="epochs: one clip per start frame of each sequence (default 1)")
    add_model_options(tr)
    tr.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the image encoder fixed (default: on, the choice for small datasets; off with --lora)")
    tr.add_argument("--lora", type=int, metavar="R", help="train LoRA adapters of rank R on the attention projections only")
    tr.add_argument("--resume", action="store_true", help="continue the run whose state lies beside --out")
    tr.add_argument("--lr", type=float, default=5e-6, help="learning rate of the heads and memory (default %(default)s)")
    tr.add_argument("--vision-lr", type=float, help="learning rate of the image encoder (default: 3/5 of --lr, "
                    "the reference recipe's ratio)")
    tr.add_argument("--accumulate", type=int, default=1, metavar="K", help="clips per optimiser step (default 1)")
    tr.add_argument("--num-frames", type=int, default=8, metavar="T", help="frames per clip (default 8)")
    tr.add_argument("--max-objects", type=int, default=3, metavar="N", help="objects per clip (default 3)")
    tr.add_argument("--no-augment", action="store_true", help="no flips, rotations, zoom or intensity changes")
    tr.add_argument("--val-every", type=int, metavar="N", help="validate every N steps (default: 10 times per run)")
    tr.add_argument("--axes", metavar="AXES", help="axes of the image files when their metadata does not say, "
                    "e.g. TYX (a 3- or 4-frame TIFF would read as channels)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same seed gives the same run")
    tr.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, error) -> int:
    import torch

    from ..checkpoints import CheckpointError
    from .data import TrainingDataError
    from .loop import TrainingError, finetune, output_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        history = finetune(
            args.data, args.out, model=args.model, checkpoint=args.checkpoint, val=args.val, steps=args.steps,
            epochs=args.epochs, image_size=args.image_size, freeze_encoder=args.freeze_encoder, lora=args.lora,
            device=args.device, precision=args.precision, resume=args.resume, lr=args.lr, vision_lr=args.vision_lr,
            accumulate=args.accumulate, num_frames=args.num_frames, max_num_objects=args.max_objects,
            augment=not args.no_augment, val_every=args.val_every, seed=args.seed, axes=args.axes, progress=not args.no_progress,
        )
    except (TrainingError, TrainingDataError, CheckpointError, ValueError, OSError) as exc:
        return error(str(exc))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the CLI's Terminated)
        state = output_paths(args.out)["state"]
        print(f"napari-sam2: training interrupted: its state is saved in {state}; run the same command with "
              "--resume to continue", file=sys.stderr)
        return 143 if type(exc).__name__ == "Terminated" else 130
    val = history.last_validation
    scores = ", ".join(f"{k[4:]} {v:.3f}" for k, v in val.items() if k.startswith("val_JF_") or k.startswith("val_J_"))
    print(f"{history.checkpoint}: {history.rows[-1]['step']} steps, last loss {history.steps[-1]['loss']:.4f}"
          + (f"; validation {scores}" if scores else ""))
    print(f"log {history.log_csv}, curves {history.plot}, resumable state {history.state}")
    return 0
