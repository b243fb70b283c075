"""One background worker that runs the annotator's heavy work in order, so the viewer never waits.

The predictor is not thread-safe and every step of a session depends on the one before (a click on
a frame that is still being encoded must wait for it), so all work goes through one thread, in the
order it was asked for. What the GUI must see (a mask, progress, a message) is handed to ``post``,
which runs a callable in the GUI thread (a queued Qt signal in the widget; a list in tests).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Cancelled", "Task", "TaskListener", "TaskQueue"]

Post = Callable[[Callable[[], None]], None]
IDLE_EXIT_S = 5.0  # an idle worker thread ends after this long; the next task starts another


class Cancelled(Exception):
    """Raised inside a task (by :meth:`Task.check`) when it was cancelled; it ends the task quietly."""


@dataclass(eq=False)
class Task:
    """A unit of work: ``run(task)`` in the worker thread; it calls :meth:`advance` and :meth:`check`."""

    name: str
    run: Callable[[Task], Any]
    total: int | None = None  # steps, for a progress bar; None: indeterminate
    key: str | None = None  # a queued task with the same key is replaced by a newer one
    done: int = 0
    message: str | None = None  # what the task is at (e.g. a training step and its loss), shown with its progress
    note: str | None = None  # what it leaves behind if it stops early (said when cancelled)
    number: int = field(default_factory=itertools.count(1).__next__)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _queue: TaskQueue | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the task is cancelled: for work that polls an event rather than calling :meth:`check`."""
        return self._cancel

    def check(self) -> None:
        """Stop here (raise :class:`Cancelled`) when the task was cancelled."""
        if self._cancel.is_set():
            raise Cancelled(self.name)

    def advance(self, steps: int = 1, total: int | None = None, message: str | None = None) -> None:
        """Count ``steps`` done (and change the total and the message), show it, then stop if cancelled."""
        self.done += steps
        if total is not None:
            self.total = total
        if message is not None:
            self.message = message
        if self._queue is not None:
            self._queue._tell("progress", self)
        self.check()


class TaskListener(Protocol):
    """What the GUI is told about tasks, always in the GUI thread."""

    def task_started(self, task: Task) -> None: ...

    def task_progress(self, task: Task) -> None: ...

    def task_finished(self, task: Task, outcome: str, error: BaseException | None) -> None:
        """``outcome``: "done", "cancelled" or "failed" (then ``error`` is set)."""


class TaskQueue:
    """Runs tasks one after another in a daemon thread; ``post`` delivers the listener's calls.

    The thread lives while there is work (and ``IDLE_EXIT_S`` after): a widget left idle, or whose
    viewer went away without closing it, holds no thread.
    """

    def __init__(self, post: Post, listener: TaskListener | None = None, name: str = "napari-sam2-worker"):
        self._post = post
        self.listener = listener
        self.name = name
        self._queue: deque[Task] = deque()
        self._wake = threading.Condition()
        self._running: Task | None = None
        self._closed = False
        self._final: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- asking
    def submit(self, task: Task, first: bool = False) -> Task:
        """Queue ``task`` (replacing a queued task of the same key), ahead of the others if ``first``;
        returns it."""
        task._queue = self
        with self._wake:
            if self._closed:
                raise RuntimeError("the worker is closed: open the widget again")
            if task.key is not None:
                for old in [t for t in self._queue if t.key == task.key]:
                    self._queue.remove(old)
            if first:
                self._queue.appendleft(task)
            else:
                self._queue.append(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._wake.notify()
        return task

    def cancel(self, keep: Callable[[Task], bool] | None = None) -> list[Task]:
        """Cancel the running task and drop the queued ones (except those ``keep`` says to keep)."""
        with self._wake:
            dropped = [t for t in self._queue if keep is None or not keep(t)]
            for t in dropped:
                self._queue.remove(t)
                t.cancel()
            running = self._running
        stopped = running is not None and (keep is None or not keep(running))
        if stopped:
            running.cancel()
        for t in dropped:
            self._tell("finished", t, "cancelled", None)
        return dropped + ([running] if stopped else [])

    @property
    def running(self) -> Task | None:
        return self._running

    @property
    def pending(self) -> list[Task]:
        with self._wake:
            return list(self._queue)

    @property
    def idle(self) -> bool:
        with self._wake:
            return self._running is None and not self._queue

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing runs or waits (scripts and tests); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._running is not None or self._queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout: float = 10.0, final: Callable[[], None] | None = None) -> bool:
        """Cancel everything and stop the thread, which runs ``final`` last (freeing what the tasks
        held); True when it ended within ``timeout`` seconds (else it ends after its current step)."""
        self.cancel()
        with self._wake:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._final = final
            self._wake.notify_all()
        if thread is None:  # no thread at work: free here
            if final is not None:
                final()
            return True
        if threading.current_thread() is not thread:
            thread.join(timeout)
        return not thread.is_alive()

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ---------------------------------------------------------------- the thread
    def _tell(self, what: str, task: Task, *args) -> None:
        listener = self.listener
        if listener is None or self._closed:
            return
        method = getattr(listener, f"task_{what}")
        self._post(lambda: method(task, *args))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    if not self._wake.wait(IDLE_EXIT_S) and not self._queue and not self._closed:
                        self._thread = None  # idle: the next submit starts a new thread
                        return
                if self._closed:
                    self._running = None
                    self._wake.notify_all()
                    break
                task = self._running = self._queue.popleft()
            outcome, error = "done", None
            try:
                if task.cancelled:
                    raise Cancelled(task.name)
                self._tell("started", task)
                task.run(task)
            except Cancelled:
                outcome = "cancelled"
            except Exception as exc:  # noqa: BLE001 - a failed task is reported, the worker goes on
                outcome, error = "failed", exc
            self._tell("finished", task, outcome, error)
            with self._wake:
                self._running = None
                self._wake.notify_all()
        if self._final is not None:
            try:
                self._final()
            except Exception:  # noqa: BLE001, S110 - nothing is left to tell at shutdown
                pass
