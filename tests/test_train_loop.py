"""finetune(): outputs a user relies on (a checkpoint that loads anywhere SAM2 loads, a log, a plot),
resume that continues the same run, and bad options refused before any training step."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from models import random_model

from napari_sam2 import build_model
from napari_sam2.synthetic import make_timelapse
from napari_sam2.train.data import TrainingDataError
from napari_sam2.train.loop import TrainingError, finetune, output_paths

SIZE = 128


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny_random.pt"
    torch.save({"model": random_model(size=SIZE, seed=0).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def stack():
    ts = make_timelapse(n_frames=4, shape=(64, 64), n_cells=2, divide=False, enter=False, seed=3)
    return ts.image, ts.labels


def _run(out, base, stack, **kw):
    options = dict(checkpoint=base, image_size=SIZE, steps=3, num_frames=3, progress=False, val_every=3)
    options.update(kw)
    return finetune([stack], out, **options)


def test_outputs_load_strictly_in_ours_and_the_reference(tmp_path, base, stack, require_reference):
    history = _run(tmp_path / "cells.pt", base, stack, freeze_encoder=True)
    paths = output_paths(tmp_path / "cells.pt")
    assert all(p.exists() for p in paths.values())
    assert [r["step"] for r in history.rows] == [0, 1, 2, 3]  # step 0: the scores before training
    assert "val_JF_mask" in history.rows[-1] and "val_J_click" in history.rows[-1]
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3] and float(rows[-1]["loss"]) == pytest.approx(history.rows[-1]["loss"])
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sd = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True)["model"]
    base_sd = torch.load(base, map_location="cpu", weights_only=True)["model"]
    assert sd.keys() == base_sd.keys()
    # the encoder was frozen, the heads learnt
    assert torch.equal(sd["image_encoder.trunk.patch_embed.proj.weight"], base_sd["image_encoder.trunk.patch_embed.proj.weight"])
    assert not torch.equal(sd["sam_mask_decoder.iou_token.weight"], base_sd["sam_mask_decoder.iou_token.weight"])
    build_model("sam2.1_hiera_tiny", checkpoint=paths["checkpoint"], image_size=SIZE)  # strict
    from sam2.build_sam import build_sam2

    build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(paths["checkpoint"]), device="cpu")  # strict


def test_lora_run_saves_merged_weights_in_the_official_layout(tmp_path, base, stack):
    _run(tmp_path / "lora.pt", base, stack, lora=4, steps=2, lr=1e-3, vision_lr=1e-3)
    sd = torch.load(tmp_path / "lora.pt", map_location="cpu", weights_only=True)["model"]
    base_sd = torch.load(base, map_location="cpu", weights_only=True)["model"]
    assert sd.keys() == base_sd.keys()
    # LoRA changed the attention projections (merged in), nothing else
    changed = {k for k in sd if not torch.equal(sd[k], base_sd[k])}
    assert changed and all(k.endswith("weight") and ("attn" in k or "_proj" in k) for k in changed), sorted(changed)[:5]
    build_model("sam2.1_hiera_tiny", checkpoint=tmp_path / "lora.pt", image_size=SIZE)


def test_resume_continues_the_same_run(tmp_path, base, stack):
    straight = _run(tmp_path / "a.pt", base, stack, steps=4, freeze_encoder=False, lr=1e-4, vision_lr=1e-4, val_every=10)
    def interrupt(row):
        if row["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b.pt", base, stack, steps=4, freeze_encoder=False, lr=1e-4, vision_lr=1e-4, val_every=10,
             on_step=interrupt)
    assert output_paths(tmp_path / "b.pt")["state"].exists()
    assert not (tmp_path / "b.pt").exists()  # no final checkpoint from a run that did not finish
    with pytest.raises(TrainingError, match="--resume"):
        _run(tmp_path / "b.pt", base, stack, steps=4, freeze_encoder=False, lr=1e-4, vision_lr=1e-4, val_every=10)
    with pytest.raises(TrainingError, match="other options"):
        _run(tmp_path / "b.pt", base, stack, steps=4, freeze_encoder=True, lr=1e-4, vision_lr=1e-4, val_every=10, resume=True)
    resumed = _run(tmp_path / "b.pt", base, stack, steps=4, freeze_encoder=False, lr=1e-4, vision_lr=1e-4, val_every=10,
                   resume=True)
    assert [r["loss"] for r in resumed.steps] == [r["loss"] for r in straight.steps]
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_before_training(tmp_path, base, stack):
    image, labels = stack
    with pytest.raises(TrainingDataError, match="shape|frames"):
        _run(tmp_path / "x.pt", base, (image, labels[:3]))
    with pytest.raises(TrainingDataError, match="no labelled object|empty"):
        _run(tmp_path / "x.pt", base, (image, np.zeros_like(labels)))
    with pytest.raises(TrainingError, match="does not exist"):
        _run(tmp_path / "missing" / "x.pt", base, stack)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere
            with pytest.raises(TrainingError, match="cannot write"):
                _run(ro / "x.pt", base, stack)
    finally:
        ro.chmod(0o700)
    other = tmp_path / "small.pt"
    torch.save({"model": build_model("sam2.1_hiera_small", pretrained=False, image_size=SIZE).state_dict()}, other)
    with pytest.raises(Exception, match="small|tiny"):
        _run(tmp_path / "x.pt", other, stack)
    own = tmp_path / "mine.pt"
    own.write_bytes(base.read_bytes())
    img = tmp_path / "movie.tif"
    tifffile.imwrite(img, image, photometric="minisblack", metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "movie_labels.tif", labels, photometric="minisblack", metadata={"axes": "TYX"})
    with pytest.raises(TrainingError, match="overwrite the input"):
        # --out the base checkpoint itself: the base must survive
        finetune([f"{img}::{tmp_path / 'movie_labels.tif'}"], own, checkpoint=own, image_size=SIZE, steps=1, progress=False)
    assert torch.load(own, weights_only=True)["model"].keys() == torch.load(base, weights_only=True)["model"].keys()
    assert not list(tmp_path.glob("x.*"))  # nothing written by the refused runs


def test_cli_train_ctrl_c_saves_the_state_and_resume_finishes(tmp_path, base, stack):
    image, labels = stack
    tifffile.imwrite(tmp_path / "movie.tif", image, photometric="minisblack", metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "movie_labels.tif", labels, photometric="minisblack", metadata={"axes": "TYX"})
    cmd = [sys.executable, "-m", "napari_sam2", "train", f"{tmp_path / 'movie.tif'}::{tmp_path / 'movie_labels.tif'}",
           "--out", str(tmp_path / "mine.pt"), "--checkpoint", str(base), "--image-size", str(SIZE), "--steps", "6",
           "--num-frames", "2", "--val-every", "2", "--threads", "1", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = output_paths(tmp_path / "mine.pt")["state"]
    deadline = time.time() + 120
    # the state is first saved after step 2: interrupt mid-run, as a user's Ctrl-C would
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and not (tmp_path / "mine.pt").exists()
    done = torch.load(state, weights_only=True)["step"]
    assert 2 <= done < 6
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "6 steps" in resumed.stdout
    with open(output_paths(tmp_path / "mine.pt")["csv"]) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(0, 7))
    build_model("sam2.1_hiera_tiny", checkpoint=tmp_path / "mine.pt", image_size=SIZE)


def test_the_resumable_state_holds_any_option_a_user_passes(tmp_path):
    from napari_sam2.train.augment import Augment
    from napari_sam2.train.loop import _settings_record
    from napari_sam2.train.prompts import PromptSettings

    record = _settings_record(augment=Augment(), lr=np.float64(1e-4), prompts=PromptSettings(), out=tmp_path / "x.pt")
    torch.save({"settings": record}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["settings"]  # no pickled classes
    assert loaded == record and loaded["lr"] == 1e-4 and loaded["augment"]["rot90"] is True


def test_validation_encodes_each_clip_once_and_keeps_a_frozen_encoders_output(stack, monkeypatch):
    """Both prompts of a validation share one encoding of a clip; with the encoder frozen a later
    validation encodes nothing, yet sees the decoder's high-resolution projections as they train."""
    from napari_sam2.train.data import open_training_data
    from napari_sam2.train.loop import validation_clips
    from napari_sam2.train.validate import ValidationFeatures, validate

    model = random_model(size=SIZE, seed=0)
    clips = validation_clips(open_training_data([stack]), SIZE, 3)
    calls = []
    encoder = model.image_encoder.forward
    monkeypatch.setattr(model.image_encoder, "forward", lambda x: calls.append(1) or encoder(x))
    kept = ValidationFeatures(keep=True)
    first = validate(model, clips, "cpu", kept)
    assert len(calls) == len(clips) == 1
    assert validate(model, clips, "cpu", kept) == first and len(calls) == 1
    with torch.no_grad():  # a training step changed the decoder's projection of a high-resolution level
        model.sam_mask_decoder.conv_s0.weight.mul_(-3.0)
    changed = validate(model, clips, "cpu", kept)
    assert len(calls) == 1
    assert changed == validate(model, clips, "cpu") != first  # the same as encoding afresh
    assert len(calls) == 2
    fresh = ValidationFeatures(keep=False)  # an encoder that trains (LoRA, full): once per validation
    validate(model, clips, "cpu", fresh)
    validate(model, clips, "cpu", fresh)
    assert len(calls) == 4 and fresh.encoded == 2
