"""Background jobs: run a long function off the caller's thread and watch it from outside.

UI-agnostic (the app polls a ``Job``; a script could too). The function receives an ``emit``
callback that appends dict events to the job and a ``should_stop`` callable it checks
cooperatively; its return value becomes ``job.result``. Everything a reader sees goes through
one lock, so a poller on another thread reads consistent snapshots.

    job = start_job(lambda emit, should_stop: select_plan(..., callback=emit,
                                                          should_stop=should_stop))
    job.status, job.events_since(0), job.latest("masks"), job.stop()

A ``JobQueue`` bounds how many heavy jobs run at once in a process (a hosted studio: many
sessions, few cores or GPUs): a job submitted to it waits its turn, in order ("queued", with
its position), and a stop while it waits cancels it before it runs. ``on_end(job)`` is called
once the job has ended, however it ended (done, stopped, error, cancelled while waiting), on
its worker thread: the place to record an outcome that must survive the watcher.
"""
from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable

from .errors import LLRCError, Stopped

STATUSES = ("pending", "queued", "running", "done", "stopped", "error")
JobFn = Callable[[Callable[[dict], None], Callable[[], bool]], Any]


class JobQueue:
    """First come, first served: at most ``slots`` jobs of this queue run at once."""

    def __init__(self, slots: int = 1):
        if slots < 1:
            raise ValueError(f"a job queue needs at least one slot, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running = 0

    def acquire(self, job: "Job") -> bool:
        """Block until ``job`` is first in line and a slot is free (True), or until it is
        stopped while waiting (False: it leaves the line)."""
        with self._cond:
            self._waiting.append(job)
            while self._waiting[0] is not job or self._running >= self.slots:
                if job.should_stop():
                    self._waiting.remove(job)
                    self._cond.notify_all()
                    return False
                self._cond.wait(0.1)
            self._waiting.pop(0)
            self._running += 1
            self._cond.notify_all()
            return True

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def position(self, job: "Job") -> int:
        """1 for the next job to run, 2 behind it, ...; 0 when not waiting."""
        with self._cond:
            return self._waiting.index(job) + 1 if job in self._waiting else 0

    @property
    def running(self) -> int:
        with self._cond:
            return self._running


class Job:
    """A function running on a worker thread, with its events, result and error."""

    def __init__(self, fn: JobFn, name: str = "job", queue: JobQueue | None = None,
                 alive: Callable[[], bool] | None = None,
                 on_end: Callable[["Job"], None] | None = None):
        self.name = name
        self._on_end = on_end
        self.queue = queue
        self._alive = alive or (lambda: True)       # False once the job's owner has gone
        self._fn = fn
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended = threading.Event()         # set after on_end, when the job has ended
        self._events: list[dict] = []
        self._latest: dict[str, dict] = {}          # event type -> newest event of that type
        self._status = "pending"
        self.result: Any = None
        self.error: str | None = None               # one-line message for the user
        self.traceback: str | None = None           # full traceback for logs (unexpected errors)
        self.started: float | None = None
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"llrc-{name}", daemon=True)

    # --- worker side --------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        """Append an event (a dict with a ``"type"``); called from the worker."""
        event = {**event, "time": time.time()}
        with self._lock:
            self._events.append(event)
            self._latest[event.get("type", "")] = event

    def should_stop(self) -> bool:
        """Asked to stop, or its owner (a browser session) has gone away."""
        return self._stop.is_set() or not self._alive()

    def _run(self) -> None:
        try:
            if self.queue is None:
                self._work()
            else:
                with self._lock:
                    self._status = "queued"
                if not self.queue.acquire(self):      # stopped while waiting: never ran
                    with self._lock:
                        self._status, self.finished = "stopped", time.time()
                    return
                try:
                    self._work()
                finally:
                    self.queue.release()
        finally:
            try:
                if self._on_end is not None:
                    self._on_end(self)
            finally:
                self._ended.set()        # a watcher sees the end only once it is recorded

    def _work(self) -> None:
        with self._lock:
            self._status, self.started = "running", time.time()
        try:
            result = self._fn(self.emit, self.should_stop)
            status, error, tb = ("stopped" if self.should_stop() else "done"), None, None
        except Stopped:                      # the one stop contract: never an error
            result, status, error, tb = None, "stopped", None, None
        except (LLRCError, ValueError, FileNotFoundError, FileExistsError) as exc:
            result, status, error, tb = None, "error", str(exc), traceback.format_exc()
        except Exception as exc:  # noqa: BLE001 -- report any failure to the watcher
            result, status, tb = None, "error", traceback.format_exc()
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.result, self.error, self.traceback = result, error, tb
            self._status, self.finished = status, time.time()

    # --- watcher side -------------------------------------------------------------------------
    def start(self) -> "Job":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the function to stop at its next check: it returns what it has (status
        "stopped"), or raises ``errors.Stopped`` when it has nothing (also "stopped")."""
        self._stop.set()

    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    @property
    def running(self) -> bool:
        """Not finished yet: pending, waiting in its queue, running, or recording how it
        ended (``on_end``)."""
        return not self._ended.is_set()

    @property
    def position(self) -> int:
        """Place in its queue's line (1: next), 0 when not waiting."""
        return self.queue.position(self) if self.queue is not None else 0

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def events_since(self, index: int = 0, type: str | None = None) -> list[dict]:
        """Events from position ``index`` on (optionally of one type), a snapshot copy."""
        with self._lock:
            events = self._events[index:]
        return [e for e in events if type is None or e.get("type") == type]

    def latest(self, type: str) -> dict | None:
        with self._lock:
            return self._latest.get(type)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (True) or ``timeout`` passes (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start_job(fn: JobFn, name: str = "job", queue: JobQueue | None = None,
              alive: Callable[[], bool] | None = None,
              on_end: Callable[[Job], None] | None = None) -> Job:
    """Create a ``Job`` for ``fn(emit, should_stop)`` and start its worker thread (waiting for
    a slot of ``queue`` first, when given; stopping once ``alive()`` turns false; calling
    ``on_end(job)`` when it has ended)."""
    return Job(fn, name, queue, alive, on_end).start()
