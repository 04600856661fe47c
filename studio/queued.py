"""Heavy page work as jobs of the shared queue, and the one panel that shows such a job.

Decompositions, compressions, comparisons, evaluations and exports never run in a page's
script thread: each is a job of ``common.job_queue()`` (at most ``LLRC_STUDIO_JOBS`` at once,
the others wait in order), owned by the browser session that started it (it stops when the
visitor leaves). A page keeps its job in ``st.session_state[key]``:

* ``start(key, fn, name)`` submits ``fn(emit, should_stop)``;
* ``header(job, stop_key, ...)`` draws the top of a job's panel: its place in line while it
  waits, the page's progress while it runs (Stop leaves the line or stops the work), and its
  error as a message (the traceback goes to the server log when the job ends);
* ``watch(key, what)`` is the whole panel for work without live charts: it refreshes every
  second and reruns the page when the job ends, and returns the ended job;
* ``result(key, fn, name, what, inputs)`` is the short form for work the page needs before it
  can draw anything: the result when done, else the panel and ``st.stop()``.
"""
from __future__ import annotations

import streamlit as st

from llrc_core.jobs import Job, start_job
from studio import common


def start(key: str, fn, name: str, inputs=None, on_end=None) -> Job:
    """Submit ``fn`` for this session under ``key`` (a job still running there is stopped)."""
    old = st.session_state.get(key)
    if old is not None and old.running:
        old.stop()
    job = start_job(fn, name=name, queue=common.job_queue(), alive=common.owner_alive(),
                    on_end=lambda job: _ended(job, on_end))
    st.session_state[key], st.session_state[f"{key}:inputs"] = job, inputs
    return job


def _ended(job: Job, then) -> None:
    """On the worker, once: a failure's traceback into the server log (the visitor sees only
    the message), then the caller's ``on_end``."""
    if job.status == "error" and job.traceback:
        common.log.error("job %s failed:\n%s", job.name, job.traceback)
    if then is not None:
        then(job)


def header(job: Job, stop_key: str, what: str, fraction: float | None = None) -> None:
    """Place in line (waiting), ``what`` with ``fraction`` done (running), Stop while either;
    the error message once it failed."""
    if job.running:
        top = st.columns([4, 1])
        if job.status == "queued":
            top[0].info(common.waiting_text(job))
        elif fraction is None:
            top[0].info(f"{what} - {job.seconds:.0f} s", icon=":material/hourglass_top:")
        else:
            top[0].progress(min(1.0, max(0.0, fraction)), text=f"{what} - {job.seconds:.0f} s")
        if top[1].button("Stop", key=stop_key, type="secondary", disabled=job.stop_requested):
            job.stop()
            if job.status == "running":
                st.toast("Stopping ...")
    elif job.status == "error":
        st.error(job.error)


def _panel(key: str, what: str) -> None:
    with common.error_box():
        job = st.session_state.get(key)
        if job is None or not job.running:
            st.rerun()                          # the whole page, now with the job's end
        header(job, f"{key}_stop", what)


def watch(key: str, what: str) -> Job | None:
    """The panel of this session's job ``key``: refreshed every second while it waits or
    runs (the page reruns when it ends); returns the job once it has ended (None before,
    or when there is none). A failed job's message is shown here."""
    job = st.session_state.get(key)
    if job is None:
        return None
    if job.running:
        st.fragment(_panel, run_every=1.0)(key, what)
        return None
    header(job, f"{key}_stop", what)
    return job


def result(key: str, fn, name: str, what: str, inputs):
    """``fn``'s result once its job (started here for these ``inputs``) is done. Before, or
    when it failed or was stopped, the panel (with "Try again") and ``st.stop()``."""
    job = st.session_state.get(key)
    if job is None or st.session_state.get(f"{key}:inputs") != inputs:
        job = start(key, fn, name, inputs)
    ended = watch(key, what)
    if ended is not None and ended.status == "done":
        return ended.result
    if ended is not None:
        if ended.status == "stopped":
            st.info(f"{what}: stopped.")
        if st.button("Try again", key=f"{key}_again"):
            start(key, fn, name, inputs)
            st.rerun()
    st.stop()
