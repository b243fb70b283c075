"""Fine-tuning learns: from random weights, two short synthetic clips are overfitted with the full recipe
(random prompts, corrective clicks, the loss, the optimiser), measured as a user would, by masklets
propagated from frame 0 (a mask, and one click)."""

from __future__ import annotations

import torch
from models import random_model

from napari_sam2.synthetic import make_timelapse
from napari_sam2.train.loop import finetune

SIZE = 256
STEPS = 25


def test_two_clips_are_overfitted_from_random_weights(tmp_path):
    base = tmp_path / "random.pt"
    torch.save({"model": random_model(size=SIZE, seed=0).state_dict()}, base)
    data = []
    for seed in (1, 2):
        ts = make_timelapse(n_frames=3, shape=(96, 96), n_cells=1, divide=False, enter=False, seed=seed)
        data.append((ts.image, ts.labels))
    history = finetune(data, tmp_path / "overfit.pt", checkpoint=base, image_size=SIZE, steps=STEPS, num_frames=3,
                       augment=False, freeze_encoder=False, lr=3e-4, vision_lr=3e-4, weight_decay=0.0,
                       val_every=STEPS, progress=False, seed=0)
    before, after = history.rows[0], history.rows[-1]
    assert before["step"] == 0 and after["step"] == STEPS
    # tracked frames 1-2 of both clips, from the first frame's mask and from one click
    assert before["val_J_mask"] <= 0.1 and before["val_J_click"] <= 0.1, before
    assert after["val_J_mask"] >= 0.9 and after["val_J_click"] >= 0.9, after
    assert after["val_JF_mask"] >= 0.9, after
