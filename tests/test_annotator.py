"""The Qt-free annotator behind the widget (``napari_sam2.annotator``): its worker queue, the prompts read
from napari layers, the geometry of the layers it adds, and whole sessions with a real (untrained) SAM2.

With untrained weights SAM2 mostly judges clicked objects absent, but a mask prompt is its own output on
the prompted frame: masks of full-width rows come back pixel for pixel at image size 128, so the tests
that must see real pixels prompt with :func:`band` masks.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from napari.layers import Image, Points, Shapes

from napari_sam2.annotator import (
    Annotator,
    AnnotatorError,
    Cancelled,
    FramePrompt,
    LineageOptions,
    ModelChoice,
    StackView,
    Task,
    TaskQueue,
    collect_prompts,
    diff_prompts,
)
from napari_sam2.build import build_model
from napari_sam2.io import open_stack
from napari_sam2.predictor.seeding import FrameSeeder
from napari_sam2.predictor.video import VideoPredictor
from napari_sam2.synthetic import make_timelapse

TINY = ModelChoice("sam2.1_hiera_tiny", image_size=128, device="cpu")
N, H, W = 5, 64, 64


# ===================================================================== helpers
def band(y0: int, y1: int) -> np.ndarray:
    """Rows y0..y1-1 of a frame: a mask SAM2 gives back exactly when it is a mask prompt."""
    mask = np.zeros((H, W), bool)
    mask[y0:y1] = True
    return mask


def run_now(call) -> None:
    """A synchronous post: the listener is called at once, in the worker thread."""
    call()


class GuiThread:
    """A post that queues the calls for the test thread, as the Qt event loop does for the widget."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()

    def post(self, call) -> None:
        self.calls.put(call)

    def run_until(self, done, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.calls.get(timeout=max(deadline - time.monotonic(), 0.01))()

    def run_pending(self) -> None:
        while not self.calls.empty():
            self.calls.get()()


class Recorder:
    """An AnnotatorListener that keeps what it was told; ``on_frame(t)`` runs after each shown frame."""

    def __init__(self):
        self.frames: list[tuple[int, np.ndarray]] = []
        self.erased: list = []
        self.statuses: list[str] = []
        self.rows = None
        self.ready: list[str] = []
        self.started: list[Task] = []
        self.progress: list[tuple[Task, int, int | None]] = []
        self.finished: dict[Task, tuple[str, BaseException | None]] = {}
        self.on_frame = None

    def show_frame(self, t, labels):
        self.frames.append((t, np.array(labels, copy=True)))
        if self.on_frame is not None:
            self.on_frame(t)

    def erase_objects(self, obj_ids):
        self.erased.append(obj_ids)

    def show_status(self, text):
        self.statuses.append(text)

    def show_objects(self, rows):
        self.rows = rows

    def model_ready(self, text):
        self.ready.append(text)

    def task_started(self, task):
        self.started.append(task)

    def task_progress(self, task):
        self.progress.append((task, task.done, task.total))

    def task_finished(self, task, outcome, error):
        self.finished[task] = (outcome, error)


def shown(rec: Recorder) -> list[int]:
    return [t for t, _ in rec.frames]


def latest(rec: Recorder) -> dict[int, np.ndarray]:
    """The labels last shown on each frame."""
    return dict(rec.frames)


def settle(annotator: Annotator) -> None:
    assert annotator.queue.wait_idle(timeout=60), "the worker did not finish within 60 s"


def failure(rec: Recorder, task: Task) -> BaseException:
    outcome, error = rec.finished[task]
    assert outcome == "failed", (outcome, error)
    return error


def session_of(annotator: Annotator):
    """The predictor's session (the worker's own: read it only when the worker is idle)."""
    return annotator._state


def points_layer(coords, obj_ids, positive=None, ndim: int = 3) -> Points:
    positive = [True] * len(obj_ids) if positive is None else positive
    return Points(np.asarray(coords, float).reshape(-1, ndim), ndim=ndim,
                  features={"obj_id": np.asarray(obj_ids, int), "positive": np.asarray(positive, bool)})


def rectangle(t: int, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """A rectangle on frame t, corners in napari's drawing order (not sorted)."""
    return np.array([[t, y1, x1], [t, y1, x0], [t, y0, x0], [t, y0, x1]], float)


def view_of(data, name: str = "movie", **kwargs) -> StackView:
    return StackView(Image(data, name=name, **kwargs))


def serve(predictor):
    return lambda choice, report: predictor


def never_built(choice, report):
    raise AssertionError("this task needs no model")


# ===================================================================== fixtures
@pytest.fixture(scope="module")
def model(random_checkpoint):
    return build_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu", image_size=128)


@pytest.fixture
def predictor(model):
    """A predictor of its own per test (its feature cache is the test's own folder)."""
    return VideoPredictor(model, add_all_frames_to_correct_as_cond=True)


@pytest.fixture(scope="module")
def movie():
    return make_timelapse(n_frames=N, shape=(H, W), n_cells=2, divide=False, enter=False, seed=1)


@pytest.fixture
def view(movie):
    return view_of(movie.image)


@pytest.fixture
def make_annotator():
    made = []

    def make(build, post=run_now, view=None):
        rec = Recorder()
        annotator = Annotator(post, rec, build=build)
        annotator.choose_model(TINY)
        if view is not None:
            annotator.show(view)
        made.append(annotator)
        return annotator, rec

    yield make
    for annotator in made:
        annotator.close(timeout=30)


@pytest.fixture
def session(predictor, view, make_annotator):
    return make_annotator(serve(predictor), view=view)


@pytest.fixture
def worker():
    queues = []

    def make():
        rec = Recorder()
        q = TaskQueue(run_now, rec)
        queues.append(q)
        return q, rec

    yield make
    for q in queues:
        q.close()


# ===================================================================== TaskQueue
def gate(q: TaskQueue) -> threading.Event:
    """Hold the worker on a task (running when this returns) until the returned event is set."""
    inside, release = threading.Event(), threading.Event()

    def hold(task):
        inside.set()
        release.wait(10)

    q.submit(Task("gate", hold))
    assert inside.wait(10)
    return release


def test_tasks_run_in_submission_order_in_one_worker_thread(worker):
    q, rec = worker()
    ran = []
    release = gate(q)
    tasks = [q.submit(Task(name, lambda task: ran.append((task.name, threading.current_thread()))))
             for name in ("a", "b", "c")]
    assert [t.name for t in q.pending] == ["a", "b", "c"] and not q.idle
    release.set()
    assert q.wait_idle(10)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    threads = {thread for _, thread in ran}
    assert len(threads) == 1 and threading.main_thread() not in threads
    assert all(rec.finished[t] == ("done", None) for t in tasks)


def test_a_task_with_a_key_replaces_the_queued_one(worker):
    q, rec = worker()
    ran = []
    release = gate(q)
    first = q.submit(Task("old", lambda task: ran.append("old"), key="prompts"))
    q.submit(Task("other", lambda task: ran.append("other")))
    q.submit(Task("new", lambda task: ran.append("new"), key="prompts"))
    assert [t.name for t in q.pending] == ["other", "new"]
    release.set()
    assert q.wait_idle(10)
    assert ran == ["other", "new"]
    assert first not in rec.started


@pytest.mark.parametrize("step", ["advance", "check"])
def test_cancel_stops_the_running_task_at_its_next_step_and_drops_the_queued(worker, step):
    q, rec = worker()
    inside, resume = threading.Event(), threading.Event()
    ran = []

    def long(task):
        inside.set()
        resume.wait(10)
        getattr(task, step)()
        ran.append("after the step")

    running = q.submit(Task("long", long))
    queued = q.submit(Task("queued", lambda task: ran.append("queued")))
    assert inside.wait(10)
    assert q.cancel() == [queued, running]
    resume.set()
    assert q.wait_idle(10)
    assert ran == []
    assert running.cancelled and queued.cancelled
    assert rec.finished[running] == ("cancelled", None)
    assert rec.finished[queued] == ("cancelled", None) and queued not in rec.started
    later = q.submit(Task("later", lambda task: ran.append("later")))  # the worker goes on
    assert q.wait_idle(10)
    assert ran == ["later"] and rec.finished[later] == ("done", None)


def test_progress_is_reported_with_each_step(worker):
    q, rec = worker()

    def count(task):
        task.advance(0, 3)
        for _ in range(3):
            task.advance()

    task = q.submit(Task("count", count))
    assert q.wait_idle(10)
    assert [(done, total) for t, done, total in rec.progress if t is task] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_a_failing_task_is_reported_and_the_worker_goes_on(worker):
    q, rec = worker()
    boom = ValueError("boom")

    def fail(task):
        raise boom

    bad = q.submit(Task("bad", fail))
    good = q.submit(Task("good", lambda task: None))
    assert q.wait_idle(10)
    assert rec.finished[bad] == ("failed", boom)
    assert rec.finished[good] == ("done", None)
    assert q.alive


def test_close_ends_the_thread_and_runs_final_last(worker):
    q, rec = worker()
    events = []
    inside = threading.Event()

    def long(task):
        inside.set()
        while True:  # work in steps until cancelled
            time.sleep(0.005)
            task.advance()

    q.submit(Task("long", long))
    assert inside.wait(10)
    assert q.close(timeout=10, final=lambda: events.append(threading.current_thread().name))
    assert not q.alive
    assert events == ["napari-sam2-worker"]
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(Task("too late", lambda task: None))


def test_cancelled_is_raised_by_check():
    task = Task("t", lambda task: None)
    task.check()  # not cancelled: nothing happens
    task.cancel()
    with pytest.raises(Cancelled):
        task.check()


# ===================================================================== prompts from the layers
def test_points_are_grouped_per_frame_and_object_with_their_signs():
    view = view_of(np.zeros((N, H, W), np.uint16))
    layer = points_layer([[0, 10, 20], [0, 12, 22], [2, 30, 40], [0, 50, 5], [7, 1, 1], [1, 3, 3]],
                         [1, 1, 1, 2, 1, 0], [True, False, True, True, True, True])
    prompts = collect_prompts(view, layer)
    assert sorted(prompts) == [(0, 1), (0, 2), (2, 1)]  # frame 7 is outside, obj 0 is no object
    assert prompts[(0, 1)].points == [(10.0, 20.0), (12.0, 22.0)]
    assert prompts[(0, 1)].positive == [True, False]
    assert prompts[(0, 2)].points == [(50.0, 5.0)] and prompts[(0, 2)].box is None
    xy, labels = prompts[(0, 1)].xy_points(H, W)  # the predictor's (x, y) order
    np.testing.assert_array_equal(xy, [[20, 10], [22, 12]])
    np.testing.assert_array_equal(labels, [1, 0])


def test_a_rectangle_is_a_box_y0_x0_y1_x1():
    view = view_of(np.zeros((N, H, W), np.uint16))
    boxes = Shapes([rectangle(3, 10, 20, 30, 40)], shape_type="rectangle", ndim=3, features={"obj_id": [4]})
    prompts = collect_prompts(view, boxes=boxes)
    assert list(prompts) == [(3, 4)]
    assert prompts[(3, 4)].box == (10, 20, 30, 40)
    assert prompts[(3, 4)].has_clicks
    assert prompts[(3, 4)].xyxy_box(H, W) == [20, 10, 40, 30]


def test_prompts_on_another_slice_of_a_fixed_axis_are_ignored():
    layer = Image(np.zeros((2, N, 16, 16), np.uint16), name="4d")
    view = StackView(layer, axis=1, fixed={0: 1})
    assert view.n_frames == N and view.labels_shape == (2, N, 16, 16)
    assert view.frame_index(3) == (1, 3)
    assert view.frame_of([0, 3, 4, 4]) is None and view.frame_of([1, 3, 4, 4]) == 3
    layer_points = points_layer([[1, 3, 4, 5], [0, 3, 6, 7], [1, 2, 8, 9]], [1, 1, 2], ndim=4)
    prompts = collect_prompts(view, layer_points)
    assert sorted(prompts) == [(2, 2), (3, 1)]
    assert prompts[(3, 1)].points == [(4.0, 5.0)]


def test_a_2d_image_is_a_video_of_one_frame():
    view = view_of(np.zeros((H, W), np.uint16), name="still")
    assert view.n_frames == 1 and view.labels_shape == (H, W) and view.video.shape == (1, H, W)
    assert view.frame_of([33.0, 7.0]) == 0
    prompts = collect_prompts(view, points_layer([[33, 7]], [3], ndim=2))
    assert list(prompts) == [(0, 3)] and prompts[(0, 3)].points == [(33.0, 7.0)]
    assert view.geometry()["axis_labels"] == ("y", "x")


def test_an_rgb_video_is_segmented_as_tyxc():
    view = view_of(np.zeros((N, 8, 8, 3), np.uint8), rgb=True)
    assert view.axes == "TYXC" and view.n_frames == N and view.labels_shape == (N, 8, 8)
    assert view.geometry()["axis_labels"] == ("t", "y", "x")


def test_diff_gives_changed_and_removed_and_skips_unchanged():
    view = view_of(np.zeros((N, H, W), np.uint16))
    before = collect_prompts(view, points_layer([[0, 10, 10], [1, 20, 20], [2, 30, 30]], [1, 1, 2]))
    applied = {k: v.signature() for k, v in before.items()}
    assert diff_prompts(applied, before) == ([], [])
    after = collect_prompts(view, points_layer([[0, 10, 10], [2, 31, 30], [4, 5, 5]], [1, 2, 3]),
                            masks={(3, 1): band(0, 8)})
    changed, removed = diff_prompts(applied, after)
    assert changed == [(2, 2), (3, 1), (4, 3)]
    assert removed == [(1, 1)]
    other_mask = collect_prompts(view, masks={(3, 1): band(0, 9)})[(3, 1)]
    assert other_mask.signature() != after[(3, 1)].signature()
    assert FramePrompt(mask=band(0, 8)).has_clicks is False


# ===================================================================== geometry of the layers added
def test_geometry_follows_the_image_layer():
    layer = Image(np.zeros((N, 8, 8)), scale=(2.0, 0.5, 0.25), translate=(10.0, 1.0, 2.0))
    geometry = StackView(layer).geometry()
    assert geometry["scale"] == (2.0, 0.5, 0.25)
    assert geometry["translate"] == (10.0, 1.0, 2.0)
    assert geometry["axis_labels"] == ("t", "y", "x")


def test_geometry_keeps_the_layers_own_axis_labels_and_units():
    layer = Image(np.zeros((N, 8, 8)), axis_labels=("time", "row", "col"), units=("s", "um", "um"))
    geometry = StackView(layer).geometry()
    assert geometry["axis_labels"] == ("time", "row", "col")
    assert [str(u) for u in geometry["units"]] == ["second", "micrometer", "micrometer"]


# ===================================================================== sessions with a real predictor
def test_a_click_is_sent_and_its_frame_shown(session):
    annotator, rec = session
    clicks = points_layer([[2, 30, 20]], [1])
    task = annotator.sync(clicks)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    state = session_of(annotator)
    assert state.obj_ids == [1] and 2 in state.objects[1].point_inputs
    assert shown(rec) == [2]
    assert rec.frames[0][1].shape == (H, W)
    assert len(rec.ready) == 1 and "sam2.1_hiera_tiny" in rec.ready[0]

    annotator.sync(clicks)  # nothing changed: nothing is sent again
    settle(annotator)
    assert shown(rec) == [2]

    boxes = Shapes([rectangle(3, 10, 10, 30, 30)], shape_type="rectangle", ndim=3, features={"obj_id": [2]})
    annotator.sync(points_layer([[2, 34, 20]], [1]), boxes)  # a moved click and a new box
    settle(annotator)
    assert shown(rec) == [2, 2, 3]
    assert state.obj_ids == [1, 2]
    assert state.objects[2].point_inputs[3]["point_labels"].tolist() == [[2, 3]]  # a box's two corners


def test_deleted_clicks_clear_their_frame_and_then_the_object(session):
    annotator, rec = session
    annotator.sync(points_layer([[0, 30, 20], [2, 30, 20]], [1, 1]))
    settle(annotator)
    state = session_of(annotator)
    assert sorted(state.objects[1].point_inputs) == [0, 2]
    rec.frames.clear()

    annotator.sync(points_layer([[0, 30, 20]], [1]))  # the click on frame 2 was deleted
    settle(annotator)
    assert sorted(state.objects[1].point_inputs) == [0]
    assert shown(rec) == [2] and rec.erased == []

    annotator.sync(points_layer([], []))  # its last click too: the object goes
    settle(annotator)
    assert state.obj_ids == [] and rec.erased == [[1]]


def test_a_mask_prompt_shows_exactly_that_mask(session):
    annotator, rec = session
    mask = band(8, 24)
    task = annotator.use_mask(1, 3, mask)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    assert shown(rec) == [1]
    np.testing.assert_array_equal(rec.frames[0][1], mask.astype(np.uint32) * 3)
    assert list(annotator.mask_prompts) == [(1, 3)]


def test_propagate_forward_shows_the_frames_in_order_and_counts_them(session):
    annotator, rec = session
    mask = band(8, 24)
    annotator.use_mask(1, 3, mask)
    settle(annotator)
    rec.frames.clear()
    task = annotator.propagate("forward", 0, 4)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    assert shown(rec) == [1, 2, 3, 4]  # from the first prompted frame
    np.testing.assert_array_equal(rec.frames[0][1], mask.astype(np.uint32) * 3)
    assert [(done, total) for t, done, total in rec.progress if t is task] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_object_rows_give_where_each_object_is_drawn_and_its_scores(session):
    annotator, rec = session
    annotator.use_mask(1, 1, band(8, 24))
    annotator.use_mask(3, 2, band(40, 56))
    annotator.propagate("forward", 0, 4)
    settle(annotator)
    frames = latest(rec)
    rows = rec.rows
    assert [r.obj_id for r in rows] == [1, 2]
    for row in rows:
        drawn = [t for t in sorted(frames) if (frames[t] == row.obj_id).any()]
        assert (row.first, row.last) == (drawn[0], drawn[-1])
        assert row.scores.shape == (N,)
    assert rows[0].first == 1 and rows[1].first <= 3 <= rows[1].last
    assert np.isnan(rows[0].scores[0])  # before the first prompt: never computed
    assert rows[0].scores[1] > 0 and rows[1].scores[3] > 0  # a mask prompt: present


def test_remove_object_and_reset_erase_labels_and_forget_objects(session):
    annotator, rec = session
    annotator.use_mask(1, 1, band(8, 24))
    annotator.use_mask(3, 2, band(40, 56))
    settle(annotator)
    state = session_of(annotator)
    assert state.obj_ids == [1, 2]

    annotator.remove_object(1)
    settle(annotator)
    assert rec.erased == [[1]]
    assert state.obj_ids == [2]
    assert list(annotator.mask_prompts) == [(3, 2)]
    assert [r.obj_id for r in rec.rows] == [2]

    annotator.reset()
    settle(annotator)
    assert rec.erased == [[1], None]
    assert state.obj_ids == [] and annotator.mask_prompts == {} and rec.rows == []


@pytest.mark.parametrize("how", ["mask", "click"])
def test_a_prompt_during_propagation_is_applied_after_the_frame_in_flight(session, how):
    annotator, rec = session
    first, second = band(8, 24), band(40, 56)
    annotator.use_mask(0, 1, first)
    settle(annotator)
    rec.frames.clear()
    asked = []

    def on_frame(t):
        if t == 2 and not asked:
            asked.append(t)
            if how == "mask":
                annotator.use_mask(4, 2, second)
            else:
                annotator.sync(points_layer([[4, 48, 32]], [2]))

    rec.on_frame = on_frame
    task = annotator.propagate("forward", 0, 4)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    assert shown(rec) == [0, 1, 2, 4, 3, 4]  # frame 4 of the new prompt comes before frame 3
    assert session_of(annotator).obj_ids == [1, 2]
    assert rec.progress[-1][1:] == (5, 5)
    if how == "mask":
        np.testing.assert_array_equal(rec.frames[3][1], second.astype(np.uint32) * 2)
        np.testing.assert_array_equal(rec.frames[5][1] == 2, second)  # the pass went on with it


def _interrupted_pass(session, first: int, after: int, prompt: int, *propagate) -> Task:
    """Prompt object 1 with a mask on ``first``, then propagate; once ``after`` frames are shown and
    frame 1 is among them, a mask for object 2 on frame ``prompt`` arrives."""
    annotator, rec = session
    annotator.use_mask(first, 1, band(8, 24))
    settle(annotator)
    rec.frames.clear()

    def on_frame(t):
        if t == 1 and len(rec.frames) == after:
            annotator.use_mask(prompt, 2, band(40, 56))

    rec.on_frame = on_frame
    task = annotator.propagate(*propagate)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    return task


def test_an_interrupted_pass_goes_on_to_the_end_of_its_range_only(session):
    _interrupted_pass(session, 0, 2, 4, "forward", 0, 3)  # a prompt beyond the range 0..3
    rec = session[1]
    assert shown(rec) == [0, 1, 4, 2, 3]
    assert rec.progress[-1][1:] == (4, 4)


def test_a_prompt_during_a_backward_propagation_does_not_skip_frame_0(session):
    _interrupted_pass(session, 4, 4, 3, "backward", 0, 4)
    rec = session[1]
    assert shown(rec) == [4, 3, 2, 1, 3, 0]
    assert rec.progress[-1][1:] == (5, 5)


def test_another_model_gets_every_prompt_again(model, view, make_annotator):
    built = []

    def build(choice, report):
        built.append(choice)
        return VideoPredictor(model, add_all_frames_to_correct_as_cond=True)

    annotator, rec = make_annotator(build, view=view)
    mask = band(8, 24)
    clicks = points_layer([[3, 48, 30]], [2])
    annotator.use_mask(1, 1, mask)
    annotator.sync(clicks)
    settle(annotator)
    old = session_of(annotator)
    assert old.obj_ids == [1, 2]
    rec.frames.clear()

    annotator.choose_model(ModelChoice("sam2.1_hiera_tiny", image_size=256, device="cpu"))
    task = annotator.propagate("forward", 0, 4)  # no prompt changed: the new session needs them all
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    assert [c.image_size for c in built] == [128, 256]
    assert len(rec.ready) == 2
    new = session_of(annotator)
    assert new is not old and new.obj_ids == [1, 2]
    assert old.obj_ids == []  # the old session was closed
    assert shown(rec) == [1, 3, 1, 2, 3, 4]  # the prompts' frames, then the pass
    np.testing.assert_array_equal(rec.frames[0][1], mask.astype(np.uint32))


class HoldAfter:
    """The predictor, with its propagation held after frame ``t`` until ``release`` is set."""

    def __init__(self, predictor, t: int):
        self._predictor, self.t, self.release = predictor, t, threading.Event()

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def propagate_in_video(self, state, **kwargs):
        for item in self._predictor.propagate_in_video(state, **kwargs):
            yield item
            if item[0] == self.t:
                assert self.release.wait(30), "the test never released the propagation"


def test_a_view_change_cancels_the_task_and_old_frames_are_not_shown(predictor, movie, make_annotator):
    gui = GuiThread()
    held = HoldAfter(predictor, 1)
    annotator, rec = make_annotator(serve(held), post=gui.post, view=view_of(movie.image))
    prompt = annotator.use_mask(0, 1, band(8, 24))
    gui.run_until(lambda: prompt in rec.finished)
    rec.frames.clear()
    other = view_of(movie.image[::-1].copy(), name="other")

    def on_frame(t):
        if t == 1 and annotator.view is not other:
            assert annotator.show(other)
            held.release.set()  # frame 2 is computed for the old view, and must not be shown

    rec.on_frame = on_frame
    task = annotator.propagate("forward", 0, 4)
    gui.run_until(lambda: task in rec.finished)
    settle(annotator)
    gui.run_pending()
    assert rec.finished[task] == ("cancelled", None)
    assert shown(rec) == [0, 1]

    again = annotator.use_mask(2, 5, band(40, 56))  # the new view's session starts empty
    gui.run_until(lambda: again in rec.finished)
    assert rec.finished[again] == ("done", None)
    assert session_of(annotator).obj_ids == [5]
    assert shown(rec) == [0, 1, 2]


def test_precompute_fills_the_feature_cache_and_a_click_then_needs_no_encoder(session):
    annotator, rec = session
    task = annotator.precompute(0, 4)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    features = session_of(annotator).features
    assert features.encoded == N
    assert all(features.ready(t) for t in range(N))
    assert any(f"({N} encoded now, 0 were cached)" in s for s in rec.statuses)

    annotator.sync(points_layer([[3, 30, 30]], [1]))
    settle(annotator)
    assert shown(rec) == [3]
    assert features.encoded == N and features.from_cache >= 1

    annotator.precompute(0, 4)
    settle(annotator)
    assert features.encoded == N
    assert any(f"(0 encoded now, {N} were cached)" in s for s in rec.statuses)


def test_precompute_past_the_last_frame_is_an_annotator_error(session):
    annotator, rec = session
    task = annotator.precompute(N, N + 3)
    settle(annotator)
    assert isinstance(failure(rec, task), AnnotatorError)


def test_precompute_without_a_feature_cache_says_it_is_off(model, view, make_annotator):
    annotator, rec = make_annotator(serve(VideoPredictor(model, feature_cache=False)), view=view)
    task = annotator.precompute(0, 4)
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and "feature cache is off" in str(error)


def test_segment_all_adds_new_objects_after_the_largest_id(session, movie, monkeypatch):
    annotator, rec = session
    found, taken, second = band(0, 16), band(48, 64), band(24, 40)
    seen = {}

    def fake_init(self, model, auto=None, intensity_range=None, rgb=False):
        seen["range"] = intensity_range

    def fake_call(self, image):
        seen["image"] = np.asarray(image)
        return [found, taken, second]

    monkeypatch.setattr(FrameSeeder, "__init__", fake_init)
    monkeypatch.setattr(FrameSeeder, "__call__", fake_call)
    annotator.use_mask(0, 5, band(20, 30))
    settle(annotator)
    frame_labels = np.zeros((H, W), np.uint32)
    frame_labels[taken] = 9  # already labelled: not a new object

    task = annotator.segment_all(2, None, frame_labels)
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    np.testing.assert_array_equal(seen["image"], movie.image[2])
    assert session_of(annotator).obj_ids == [5, 6, 7]
    assert sorted(annotator.mask_prompts) == [(0, 5), (2, 6), (2, 7)]
    t, labels = rec.frames[-1]
    assert t == 2
    np.testing.assert_array_equal(labels, found * 6 + second * 7)
    assert any("2 new objects (ids 6..7)" in s for s in rec.statuses)


# ===================================================================== export
@pytest.mark.parametrize(("name", "fmt"), [("m.ome.zarr", "zarr"), ("01_RES", "ctc")])
def test_export_writes_the_labels_as_given(tmp_path, movie, make_annotator, name, fmt):
    annotator, rec = make_annotator(never_built)
    labels = movie.labels.astype(np.uint32)
    expected = labels.copy()
    release = gate(annotator.queue)
    task = annotator.export(tmp_path / name, fmt, labels)
    labels[:] = 0  # the export took its copy when it was asked for
    release.set()
    settle(annotator)
    assert rec.finished[task] == ("done", None)
    source = tmp_path / name if fmt == "zarr" else str(tmp_path / name / "mask*.tif")
    np.testing.assert_array_equal(np.asarray(open_stack(source).data), expected)
    assert any("exported" in s for s in rec.statuses)


def test_export_to_a_path_that_cannot_be_written_names_it(tmp_path, movie, make_annotator):
    annotator, rec = make_annotator(never_built)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "m.ome.zarr"
    task = annotator.export(target, "zarr", movie.labels)
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and str(target) in str(error)


# ===================================================================== errors
def test_a_failed_build_fails_the_task_with_its_message(view, make_annotator):
    message = "could not load 'x.pt': not a checkpoint"

    def build(choice, report):
        raise AnnotatorError(message)

    annotator, rec = make_annotator(build, view=view)
    task = annotator.use_mask(0, 1, band(8, 24))
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and str(error) == message
    assert rec.ready == [] and rec.frames == []
    assert any("loading sam2.1_hiera_tiny" in s for s in rec.statuses)
    assert annotator.queue.alive


def test_a_broken_checkpoint_file_is_an_annotator_error_naming_it(tmp_path, view, make_annotator):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    annotator, rec = make_annotator(None, view=view)
    annotator.choose_model(ModelChoice("sam2.1_hiera_tiny", checkpoint=str(broken), device="cpu", image_size=128))
    task = annotator.load()
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and str(broken) in str(error)


def test_propagate_without_a_prompt_says_so(session):
    annotator, rec = session
    task = annotator.propagate("forward", 0, 4)
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and "no prompt yet" in str(error)
    assert rec.frames == []


def test_lineage_options_refuse_a_backward_propagation(session):
    annotator, rec = session
    annotator.use_mask(0, 1, band(8, 24))
    task = annotator.propagate("backward", 0, 4, LineageOptions(new_every=2))
    settle(annotator)
    error = failure(rec, task)
    assert isinstance(error, AnnotatorError) and "forward" in str(error)
    assert shown(rec) == [0]  # the prompt's frame, nothing propagated


def test_a_bad_mask_prompt_is_refused_at_once(session, make_annotator):
    annotator, _ = session
    with pytest.raises(AnnotatorError, match="shape"):
        annotator.use_mask(0, 1, np.ones((H, W + 1), bool))
    with pytest.raises(AnnotatorError, match="not painted"):
        annotator.use_mask(0, 1, np.zeros((H, W), bool))
    viewless, _ = make_annotator(never_built)
    with pytest.raises(AnnotatorError, match="no image"):
        viewless.use_mask(0, 1, band(8, 24))
    assert annotator.queue.idle


def test_close_ends_the_worker_and_frees_the_session(session):
    annotator, rec = session
    annotator.use_mask(0, 1, band(8, 24))
    settle(annotator)
    state = session_of(annotator)
    assert annotator.close(timeout=30)
    assert not annotator.queue.alive
    assert state.obj_ids == []
    with pytest.raises(AnnotatorError, match="closed"):
        annotator.propagate()
