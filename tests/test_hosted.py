"""A studio that strangers share: a visitor reads only inside the allowed roots and writes only
inside the workspace; ``..`` and symlink escapes are refused; "Replace" never deletes a folder
the studio did not write; a failed export leaves nothing and shows no traceback; one queue for
every session's jobs. Unit checks of ``studio/workspace.py`` and the pages through AppTest
(a session surviving a restart: ``test_resume.py``)."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT, WIKI_VALID

sys.path.insert(0, str(ROOT))   # the app's studio/ helpers


def test_reads_only_inside_allowed_roots(ws, monkeypatch):
    workspace, space, outside = ws
    assert workspace.readable(WIKI_VALID) == WIKI_VALID.resolve()          # shared data
    assert workspace.model_source(str(ROOT / "assets" / "demo-model")).endswith("demo-model")
    assert workspace.model_source("gpt2") == "gpt2"                        # a Hub id passes
    for bad in (outside / "secret.txt", "/etc/passwd",
                ROOT / "assets" / ".." / ".." / "etc",                     # .. escape
                space / "link" / "secret.txt"):                            # symlink escape
        with pytest.raises(workspace.PathRefused, match="outside the folders this studio may "
                                                        "read.*LLRC_STUDIO_ALLOWED_ROOTS"):
            workspace.readable(bad)
    monkeypatch.setenv("LLRC_STUDIO_ALLOWED_ROOTS", str(outside))           # the operator's
    assert workspace.readable(space / "link" / "secret.txt") == outside / "secret.txt"


def test_exports_only_into_the_session_folder_by_name(ws):
    workspace, space, outside = ws
    sid = workspace.new_session_id()
    folder = workspace.export_folder(sid, "demo-0.8")
    assert folder == space / "sessions" / sid / "exports" / "demo-0.8"
    for bad in ("../x", "/tmp/x", "a/b", "..", ".hidden", ""):
        with pytest.raises(workspace.PathRefused, match="not a plain folder name"):
            workspace.export_folder(sid, bad)


def test_replace_only_what_the_studio_wrote(ws):
    workspace, space, outside = ws
    folder = workspace.export_folder(workspace.new_session_id(), "model")
    folder.mkdir(parents=True)
    (folder / "weights").write_text("x")
    with pytest.raises(FileExistsError, match="tick 'Replace"):
        workspace.check_replace(folder, replace=False)
    with pytest.raises(workspace.PathRefused, match="not written by this studio"):
        workspace.check_replace(folder, replace=True)
    workspace.mark(folder)
    workspace.check_replace(folder, replace=True)                           # allowed now
    workspace.check_replace(folder.parent / "new", replace=False)           # a new name is fine


# --- the pages ----------------------------------------------------------------------------
@pytest.fixture()
def app(ws):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    return at


def test_model_page_refuses_paths_outside_the_roots(app, ws):
    _, space, outside = ws
    key = app.session_state["model_key"]
    app.radio(key="model_source").set_value("Local folder")
    for path in (str(outside), str(space / "link"), str(ROOT / "assets" / ".." / "..")):
        app.text_input(key="model_path").set_value(path)
        app.button(key="FormSubmitter:load-Load model").click().run()
        assert not app.exception
        assert "outside the folders this studio may read" in app.error[0].value
        assert app.session_state["model_key"] == key                        # nothing loaded
    app.radio(key="model_source").set_value("Demo model (MiniLM-L6 decoder, WikiText-2)")
    app.text_input(key="calib_path").set_value(str(outside / "secret.txt"))
    app.button(key="FormSubmitter:load-Load model").click().run()
    assert "outside the folders this studio may read" in app.error[0].value
    assert app.session_state["calib"]["source"] == str(WIKI_VALID)           # unchanged


# --- the job queue ------------------------------------------------------------------------
def test_queue_runs_jobs_in_order_shows_positions_and_cancels_waiting_ones():
    import threading
    import time

    from llrc_core.jobs import JobQueue, start_job
    queue, gate, order = JobQueue(slots=1), threading.Event(), []

    def work(tag):
        def fn(emit, should_stop):
            order.append(tag)
            if tag == "a":
                gate.wait(10)          # hold the only slot until the test has looked
            return tag
        return fn

    a = start_job(work("a"), queue=queue)
    while a.status != "running":
        time.sleep(0.01)
    b = start_job(work("b"), queue=queue)
    c = start_job(work("c"), queue=queue)
    d = start_job(work("d"), queue=queue)
    while d.position != 3:
        time.sleep(0.01)
    assert [j.status for j in (a, b, c, d)] == ["running", "queued", "queued", "queued"]
    assert (a.position, b.position, c.position, d.position) == (0, 1, 2, 3)
    c.stop()                                  # cancelled while waiting: it never runs
    assert c.wait(5) and c.status == "stopped" and c.result is None
    assert d.position == 2 and queue.running == 1
    gate.set()
    assert all(j.wait(10) for j in (a, b, d))
    assert order == ["a", "b", "d"] and [j.result for j in (a, b, d)] == ["a", "b", "d"]
    assert queue.running == 0


def test_queue_bounds_concurrency():
    import threading
    import time

    from llrc_core.jobs import JobQueue, start_job
    queue, lock, live = JobQueue(slots=2), threading.Lock(), [0, 0]   # now, most at once

    def fn(emit, should_stop):
        with lock:
            live[0] += 1
            live[1] = max(live[1], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1

    jobs = [start_job(fn, queue=queue) for _ in range(6)]
    assert all(j.wait(10) for j in jobs) and all(j.status == "done" for j in jobs)
    assert live[1] == 2


def test_a_job_whose_owner_left_stops_and_leaves_the_queue():
    import threading
    import time

    from llrc_core.jobs import JobQueue, start_job
    queue, gate, here = JobQueue(slots=1), threading.Event(), {"a": True, "b": True}

    def run(emit, should_stop):
        while not should_stop():
            time.sleep(0.01)
        return "partial"

    a = start_job(run, queue=queue, alive=lambda: here["a"])
    b = start_job(lambda e, s: gate.wait(5), queue=queue, alive=lambda: here["b"])
    while b.position != 1:
        time.sleep(0.01)
    here["b"] = False                         # b's visitor left while it waited
    assert b.wait(5) and b.status == "stopped" and b.started is None     # never ran
    here["a"] = False                         # a's visitor left while it ran
    assert a.wait(5) and (a.status, a.result) == ("stopped", "partial")
    assert queue.running == 0


def test_compress_page_refuses_a_run_that_would_not_fit(app, monkeypatch):
    """The memory guard: the planner's verdict on this machine, before any job starts."""
    from llrc_core import preflight
    monkeypatch.setattr(preflight, "device_memory_gib", lambda device, gpus=1: (0, 1e-4))
    app.switch_page("pages/compress.py").run()
    app.selectbox(key="compress_method").set_value("uniform").run()
    app.button(key="FormSubmitter:compress_form-Start compression").click().run()
    assert not app.exception
    assert "more than this machine's" in app.error[0].value
    assert "compress_job" not in app.session_state                          # nothing started


# --- nothing half-written, no traceback for a visitor -----------------------------------------
def test_sweep_removes_only_what_a_killed_export_left(ws):
    workspace, space, outside = ws
    exports = workspace.session_dir(workspace.new_session_id()) / "exports"
    old, fresh = exports / ".model.tmp-abc123", exports / ".model.tmp-def456"
    aside, kept = exports / ".model.old-4242", exports / "model"
    for folder in (old, fresh, aside, kept):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    (exports / ".link.tmp-1").symlink_to(outside, target_is_directory=True)
    before = workspace.STARTED - 60                  # written by a server that has died
    for folder in (old, aside, kept):
        os.utime(folder, (before, before))
    assert sorted(p.name for p in workspace.sweep_partial(exports)) == [".model.old-4242",
                                                                      ".model.tmp-abc123"]
    assert sorted(p.name for p in exports.iterdir()) == [".link.tmp-1", ".model.tmp-def456",
                                                        "model"]
    assert (outside / "secret.txt").exists()            # a link is never followed


def test_a_failed_export_leaves_no_folder_and_shows_no_traceback(app, ws, monkeypatch):
    import time

    from llrc_core import shards
    _, space, _ = ws
    app.switch_page("pages/compress.py").run()
    app.selectbox(key="compress_method").set_value("uniform").run()
    app.number_input(key="n_eval").set_value(0)
    app.button(key="FormSubmitter:compress_form-Start compression").click().run()
    for key in ("compress_job", "export_job"):
        if key == "export_job":                         # the disk fills while writing
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(shards, "save_file", full)
            app.switch_page("pages/export.py").run()
            app.text_input(key="export_folder").set_value("full")
            app.button(key="FormSubmitter:export_form-Save to folder").click().run()
        t0 = time.time()
        while app.session_state[key].running:
            assert time.time() - t0 < 300
            time.sleep(0.2)
        app.run()
    assert app.session_state["export_job"].status == "error"
    assert not app.exception
    assert [e.value for e in app.error] == ["OSError: [Errno 28] No space left on device"]
    exports = space / "sessions" / app.session_state["session_id"] / "exports"
    assert list(exports.iterdir()) == []         # no folder, no temporary, no marker
