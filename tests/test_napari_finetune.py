"""Fine-tuning from the annotator and the widget (SAM2's data engine: annotate, correct, fine-tune,
annotate faster): the session trains in its worker on its own video and the corrected labels, switches
to the new checkpoint, refuses bad labels before training, and stops cleanly when cancelled.

Runs are tiny (image size 128, 2-frame clips, 2 steps of an untrained network): what is tested is the
plumbing, not that the weights get better.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from napari.layers import Image
from test_annotator import Recorder, band, failure, run_now

from napari_sam2.annotator import Annotator, AnnotatorError, ModelChoice, StackView
from napari_sam2.build import build_model
from napari_sam2.synthetic import make_timelapse
from napari_sam2.train import loop

NAME = "sam2.1_hiera_tiny"
TRAIN = {"steps": 2, "num_frames": 2}
TIMEOUT = 300  # s; a run takes ~10-40 s on 2 busy cores


@pytest.fixture(scope="module")
def movie():
    return make_timelapse(n_frames=3, shape=(64, 64), n_cells=2, divide=False, enter=False, seed=1)


@pytest.fixture
def choice(random_checkpoint):
    return ModelChoice(NAME, str(random_checkpoint), device="cpu", image_size=128, precision="fp32")


class TrainingRecorder(Recorder):
    """Also keeps each progress message, the labels it was told of last, and calls ``on_progress(task)``."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []
        self.trained: list[tuple] = []
        self.events: list[str] = []
        self.on_progress = None

    def task_progress(self, task):
        super().task_progress(task)
        if task.message:
            self.messages.append(task.message)
            self.events.append(task.message)
        if self.on_progress is not None:
            self.on_progress(task)

    def show_frame(self, t, labels):
        super().show_frame(t, labels)
        self.events.append(f"frame {t}")

    def model_trained(self, checkpoint, text):
        self.trained.append((checkpoint, text))


@pytest.fixture
def session(movie, choice):
    made = []

    def make(build=None):
        rec = TrainingRecorder()
        annotator = Annotator(run_now, rec, build=build)
        annotator.choose_model(choice)
        annotator.show(StackView(Image(movie.image, name="movie")))
        made.append(annotator)
        return annotator, rec

    yield make
    for annotator in made:
        annotator.close(timeout=60)


def settle(annotator: Annotator) -> None:
    assert annotator.queue.wait_idle(timeout=TIMEOUT), "the worker did not finish"


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def spy_finetune(monkeypatch) -> list:
    """Calls of finetune: (kwargs, what it raised or None)."""
    real, calls = loop.finetune, []

    def spy(data, out, **kwargs):
        calls.append([kwargs, None])
        try:
            return real(data, out, **kwargs)
        except BaseException as exc:
            calls[-1][1] = exc
            raise

    monkeypatch.setattr(loop, "finetune", spy)
    return calls


# ===================================================================== the annotator (no Qt)
def test_train_switches_the_session_to_the_fine_tuned_checkpoint(session, movie, choice, tmp_path, monkeypatch):
    annotator, rec = session()
    calls = spy_finetune(monkeypatch)
    annotator.use_mask(0, 1, band(10, 20))  # the session tracks with the base model first
    settle(annotator)
    old_predictor = annotator._predictor
    before = weights(old_predictor.model)

    def click_while_training(task):
        if task.message and task.message.startswith("step 1/"):
            rec.on_progress = None
            annotator.use_mask(2, 3, band(40, 50))

    rec.on_progress = click_while_training
    out = tmp_path / "mine.pt"
    task = annotator.train(movie.labels, out, **TRAIN)
    settle(annotator)
    assert rec.finished[task] == ("done", None), rec.finished[task]
    (kwargs, raised), = calls
    assert raised is None and kwargs["model"] == NAME and kwargs["checkpoint"] == choice.checkpoint
    assert kwargs["image_size"] == 128 and kwargs["device"] == "cpu" and kwargs["progress"] is False
    # the outputs, loadable strictly as the base model's weights
    assert out.is_file() and out.with_suffix(".train.pt").is_file() and out.with_suffix(".csv").is_file()
    build_model(NAME, checkpoint=out, image_size=128)
    # progress: step / steps and the running loss
    steps = [m for m in rec.messages if m.startswith("step ")]
    assert steps[0].startswith("step 1/2, loss ") and steps[-1].startswith("step 2/2, loss ")
    assert task.done == task.total == 2
    # the click given during training was answered between two steps, by the base model
    assert rec.events.index("frame 2") < rec.events.index(steps[-1])
    # the session now runs the new checkpoint; the old predictor's weights were never touched
    assert annotator.choice == ModelChoice(NAME, str(out), "cpu", 128, "fp32") == annotator._built
    assert annotator._predictor is not old_predictor
    assert all(torch.equal(v, old_predictor.model.state_dict()[k]) for k, v in before.items())
    summary = annotator.last_training
    assert summary.checkpoint == out and summary.steps == 2 and math.isfinite(summary.loss) and summary.jf is not None
    (checkpoint, text), = rec.trained
    assert checkpoint == str(out) and text.startswith("fine-tuned 2 steps: last loss ") and str(out) in text
    assert "validation J&F" in text and rec.ready  # and the new model was loaded in the worker
    # a mask prompt now goes through the fine-tuned model
    rec.frames.clear()
    annotator.use_mask(1, 2, band(30, 40))
    settle(annotator)
    frames = dict(rec.frames)
    assert 1 in frames and (frames[1] == 2).sum() > 200
    assert annotator._built.checkpoint == str(out)


def test_bad_labels_and_outputs_are_refused_before_training(session, movie, choice, tmp_path, monkeypatch):
    def never_built(choice, report):
        raise AssertionError("training needs no predictor")

    annotator, rec = session(build=never_built)
    calls = spy_finetune(monkeypatch)
    out = tmp_path / "mine.pt"
    with pytest.raises(AnnotatorError, match=r"the labels have shape \(2, 64, 64\).*3 frame\(s\) of 64 x 64"):
        annotator.train(movie.labels[:2], out)
    with pytest.raises(AnnotatorError, match="shape"):
        annotator.train(movie.labels[:, :32], out)
    with pytest.raises(AnnotatorError, match="integer labels"):
        annotator.train(movie.labels.astype(float), out)
    with pytest.raises(AnnotatorError, match="does not exist"):
        annotator.train(movie.labels, tmp_path / "nowhere" / "mine.pt")
    with pytest.raises(AnnotatorError, match="is the checkpoint in use"):
        annotator.train(movie.labels, choice.checkpoint)
    with pytest.raises(AnnotatorError, match="steps must be at least 1"):
        annotator.train(movie.labels, out, steps=0)
    with pytest.raises(AnnotatorError, match="unknown fine-tuning option"):
        annotator.train(movie.labels, out, epocs=2)
    (tmp_path / "old.train.pt").write_bytes(b"")
    with pytest.raises(AnnotatorError, match="holds an earlier fine-tuning run"):
        annotator.train(movie.labels, tmp_path / "old")  # .pt is added, as finetune does
    # empty labels: found by the worker (which reads them), before finetune is called
    task = annotator.train(np.zeros_like(movie.labels), out)
    settle(annotator)
    assert "labels are empty" in str(failure(rec, task))
    assert calls == [] and not out.exists() and annotator.choice == choice
    # an image opened from cells.png and the output cells.pt: the loss plot cells.png would replace it
    from napari.layers._source import layer_source

    picture = tmp_path / "cells.png"
    picture.write_bytes(b"the user's image")
    with layer_source(path=str(picture)):
        opened = Image(movie.image, name="cells")
    annotator.show(StackView(opened))
    with pytest.raises(AnnotatorError, match="over the image's own file"):
        annotator.train(movie.labels, tmp_path / "cells.pt")
    assert picture.read_bytes() == b"the user's image"
    annotator.show(None)
    with pytest.raises(AnnotatorError, match="no image"):
        annotator.train(movie.labels, out)


def test_cancel_stops_training_and_the_session_keeps_its_model(session, movie, choice, tmp_path, monkeypatch):
    annotator, rec = session()
    calls = spy_finetune(monkeypatch)
    annotator.use_mask(0, 1, band(10, 20))
    settle(annotator)
    old_predictor = annotator._predictor

    def cancel_after_step_1(task):
        if task.message and task.message.startswith("step 1/"):
            annotator.cancel()

    rec.on_progress = cancel_after_step_1
    out = tmp_path / "mine.pt"
    task = annotator.train(movie.labels, out, steps=3, num_frames=2)
    settle(annotator)
    rec.on_progress = None
    assert rec.finished[task] == ("cancelled", None) and task.done == 1
    (kwargs, raised), = calls
    assert isinstance(raised, loop.TrainingCancelled)
    assert not out.exists() and out.with_suffix(".train.pt").is_file()  # resumable, and nothing half-trained used
    assert "keeps its weights" in task.note and not rec.trained and annotator.last_training is None
    assert annotator.choice == choice and annotator._predictor is old_predictor
    rec.frames.clear()
    annotator.use_mask(1, 2, band(30, 40))
    settle(annotator)
    assert (dict(rec.frames)[1] == 2).sum() > 200 and annotator._predictor is old_predictor


# ===================================================================== the widget under napari
def test_widget_fine_tunes_on_the_masklets_and_goes_on_with_them(make_napari_viewer, movie, random_checkpoint,
                                                                 tmp_path, monkeypatch):
    pytest.importorskip("pytestqt")
    from test_napari_plugin import _paint, _widget
    from test_napari_plugin import settle as settle_widget

    import napari_sam2._widget as w

    errors = []
    monkeypatch.setattr(w, "_notify_error", errors.append)
    monkeypatch.chdir(tmp_path)  # the image has no file: the default output goes to the current folder
    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    viewer.add_labels(np.zeros_like(movie.labels), name="other labels")
    assert widget.train_labels_choice.value is widget.labels_layer  # the masklets, what one corrects
    widget.labels_layer.data[:] = movie.labels  # "corrected" masklets
    widget.finetune_toggle.setChecked(True)
    assert not widget.finetune_box.isHidden()
    widget.train_steps_spin.setValue(2)
    widget.train_frames_spin.setValue(2)
    out = tmp_path / "movie_finetuned.pt"
    assert widget.default_train_out() == out
    seen = []
    shown = widget.task_progress

    def spy(task):
        shown(task)
        seen.append(([getattr(b, "desc", "") for b in widget._progress.values() if b is not None],
                     widget.work_label.text(), widget.cancel_button.isEnabled()))

    widget.task_progress = spy
    t0 = time.perf_counter()
    widget.train_button.click()
    settle_widget(widget, TIMEOUT)
    elapsed = time.perf_counter() - t0
    assert not errors, errors
    assert out.is_file(), widget.status.text()
    build_model(NAME, checkpoint=out, image_size=128)
    # progress shown as for the other long tasks: a napari bar, the work label, Cancel enabled
    bars = [b for bars, _, _ in seen for b in bars]
    assert any("step 2/2, loss" in b for b in bars), bars
    assert any("working: fine-tune movie_finetuned.pt (1/2): step 1/2, loss" in label for _, label, _ in seen)
    assert all(enabled for _, _, enabled in seen) and not widget._progress
    # the session runs the new checkpoint, and the widget says so
    assert widget.checkpoint_edit.text() == str(out)
    assert widget.annotator.choice.checkpoint == str(out) == widget.annotator._built.checkpoint
    assert f"now runs {out}" in widget.status.text() and "fine-tuned 2 steps" in widget.status.text()
    assert widget.default_train_out() == tmp_path / "movie_finetuned-2.pt"  # the next run overwrites nothing
    _paint(widget, 1, obj=4)
    settle_widget(widget)
    assert (widget.labels_layer.data[1] == 4).any() and not errors
    assert widget.annotator._built.checkpoint == str(out)
    print(f"widget fine-tuning: {elapsed:.1f} s")


def test_widget_asks_for_lora_adapters_with_a_rank(make_napari_viewer, movie, random_checkpoint, tmp_path, monkeypatch):
    """The LoRA rank field reaches finetune (0 = none: the image encoder stays frozen)."""
    from test_napari_plugin import _widget

    viewer, widget = _widget(make_napari_viewer, movie, random_checkpoint)
    asked = []
    monkeypatch.setattr(widget.annotator, "train", lambda data, path, **kw: asked.append(kw))
    widget.finetune_toggle.setChecked(True)
    assert widget.train_lora_spin.text().startswith("none")
    widget.finetune(out=tmp_path / "a.pt")
    widget.train_lora_spin.setValue(8)
    widget.finetune(out=tmp_path / "b.pt")
    assert [kw["lora"] for kw in asked] == [None, 8]
