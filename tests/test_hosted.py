"""A studio that strangers share: a visitor reads only inside the allowed roots and writes only
inside the workspace; ``..`` and symlink escapes are refused; "Replace" never deletes a folder
the studio did not write. Unit checks of ``studio/workspace.py`` and the pages through AppTest."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT, WIKI_VALID

sys.path.insert(0, str(ROOT))   # the app's studio/ helpers


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    """A fresh workspace, an outside folder with a file, and a symlink escaping the workspace."""
    from studio import workspace
    space, outside = tmp_path / "workspace", tmp_path / "outside"
    space.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret text " * 100)
    (space / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("LLRC_STUDIO_WORKSPACE", str(space))
    monkeypatch.delenv("LLRC_STUDIO_ALLOWED_ROOTS", raising=False)
    return workspace, space, outside


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
    from llrc_core import planner
    monkeypatch.setattr(planner, "device_memory_gib", lambda device: (0, 1e-4))
    app.switch_page("pages/compress.py").run()
    app.selectbox(key="compress_method").set_value("uniform").run()
    app.button(key="FormSubmitter:compress_form-Start compression").click().run()
    assert not app.exception
    assert "more than this machine's" in app.error[0].value
    assert "compress_job" not in app.session_state                          # nothing started


def test_a_learned_run_resumes_from_its_checkpoint_in_a_new_session(ws):
    """Resilience: a learned run checkpoints into the workspace; the same run started again
    from a new session (as after a server restart) resumes it to the same plan."""
    import time

    from streamlit.testing.v1 import AppTest
    _, space, _ = ws

    def run_once():
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.run()
        at.switch_page("pages/compress.py").run()
        for key, value in (("cfg_llrc_steps", 6), ("cfg_llrc_hold_steps", 6),
                           ("cfg_llrc_batch_size", 2), ("cfg_llrc_mask_every", 0),
                           ("n_eval", 0)):
            at.number_input(key=key).set_value(value)
        at.button(key="FormSubmitter:compress_form-Start compression").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        job = at.session_state["compress_job"]
        t0 = time.time()
        while job.running:
            assert time.time() - t0 < 240
            time.sleep(0.2)
        assert job.status == "done", job.error
        return job

    first = run_once()
    assert [e["step"] for e in first.events_since(0, "step")] == [1, 2, 3, 4, 5, 6]
    (ckpt,) = (space / "checkpoints").glob("llrc-*.pt")
    second = run_once()
    assert second.events_since(0, "step") == []                  # nothing trained again
    assert second.latest("done")["step"] == 6
    assert second.result.plan.to_dict()["layers"] == first.result.plan.to_dict()["layers"]


# --- a session survives a reload or a restart -----------------------------------------------
def test_session_ids_are_unguessable_and_strictly_checked(ws):
    workspace, space, _ = ws
    sid = workspace.new_session_id()
    assert workspace.valid_session_id(sid) and len(sid) == 32 and sid != workspace.new_session_id()
    for bad in ("../" + sid[3:], sid.upper(), sid[:-1], sid + "0", "x" * 32, "", None,
                sid[:16] + "/" + sid[17:]):
        assert not workspace.valid_session_id(bad)
        with pytest.raises(workspace.PathRefused, match="bad session id"):
            workspace.session_dir(bad)
    assert workspace.session_dir(sid) == space / "sessions" / sid


def test_the_url_keeps_the_session_and_a_forged_one_is_replaced(ws):
    from streamlit.testing.v1 import AppTest
    workspace, space, _ = ws
    sid = workspace.new_session_id()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.query_params["s"] = sid                        # the same URL, after a restart
    at.run()
    assert not at.exception and at.session_state["session_id"] == sid
    for forged in ("../../etc", "a" * 31, sid.upper()):
        other = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        other.query_params["s"] = forged
        other.run()
        other.switch_page("pages/compress.py").run()          # opens the session folder
        assert not other.exception
        new = other.session_state["session_id"]
        assert new != forged and workspace.valid_session_id(new)
        assert other.query_params["s"] == new         # the URL now carries the new one
    assert all(workspace.valid_session_id(p.name) for p in (space / "sessions").iterdir())


def _interrupted_run(space, sid: str, step: int, **fields) -> "Path":
    """What a server killed mid-run leaves: a record "started" by that (dead) server and a
    checkpoint at ``step``."""
    import torch

    from llrc_core.files import atomic_json
    ckpt = space / "checkpoints" / "llrc-0123456789abcdef0123.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step}, ckpt)
    record = space / "sessions" / sid / "runs" / f"{ckpt.stem}.json"
    atomic_json(record, {"method": "llrc", "decomposition": "asvd", "options": {"steps": 40},
                         "plumbing": {}, "n_eval": 0, "label": "llrc any-k 0.80 linear (asvd)",
                         "model": [str(ROOT / "assets" / "demo-model"), "auto", "auto"],
                         "calib": {}, "checkpoint": str(ckpt), "status": "started",
                         "server": "4242-1.000", **fields})
    return record


def test_compress_page_offers_an_interrupted_run_and_discards_it(ws):
    import json

    import torch
    from streamlit.testing.v1 import AppTest
    from studio import runs
    workspace, space, outside = ws
    sid = workspace.new_session_id()

    def open_compress():
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.query_params["s"] = sid
        at.run()
        at.switch_page("pages/compress.py").run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        return at

    record = _interrupted_run(space, sid, 20)
    at = open_compress()
    offer = [w.value for w in at.warning if "interrupted run" in w.value]
    assert offer == ["An interrupted run (llrc any-k 0.80 linear (asvd)) stopped at step 20 of "
                     "40: resume it to the same plan, or discard it."]
    assert at.button(key="resume_run") and at.button(key="discard_run")
    at.button(key="discard_run").click().run()
    assert not at.exception
    assert json.loads(record.read_text())["status"] == "discarded"
    assert not [w for w in at.warning if "interrupted run" in w.value]
    assert "compress_job" not in at.session_state                      # nothing started
    # Not offered: a run this server is still running, a finished one, a checkpoint that is
    # not in the workspace's checkpoints folder, a record that is not JSON.
    torch.save({"step": 20}, outside / "llrc.pt")
    for fields in ({"server": runs.SERVER}, {"status": "done"},
                   {"checkpoint": str(outside / "llrc.pt")}):
        _interrupted_run(space, sid, 20, **fields)
        assert not [w for w in open_compress().warning if "interrupted run" in w.value]
    record.write_text("{not json")
    assert not [w for w in open_compress().warning if "interrupted run" in w.value]


def test_an_interrupted_run_resumes_to_the_plan_of_an_unbroken_one(ws, monkeypatch, tmp_path):
    """A run stopped mid-way by a dying server (its record still says "started", by another
    server) is offered on the same URL; Resume trains the remaining steps from the checkpoint
    and gives the plan of the same run done in one go (another workspace)."""
    import json
    import time

    from streamlit.testing.v1 import AppTest
    from studio import runs
    workspace, space, _ = ws
    sid = workspace.new_session_id()
    steps = 16

    def session(query=None):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        if query:
            at.query_params["s"] = query
        at.run()
        at.switch_page("pages/compress.py").run()
        return at

    def wait(job, until=lambda j: not j.running):
        t0 = time.time()
        while not until(job):
            assert time.time() - t0 < 300, job.status
            time.sleep(0.2)
        return job

    def start(at):
        for key, value in (("cfg_llrc_steps", steps), ("cfg_llrc_hold_steps", steps),
                           ("cfg_llrc_batch_size", 2), ("cfg_llrc_mask_every", 0),
                           ("n_eval", 0)):
            at.number_input(key=key).set_value(value)
        at.button(key="FormSubmitter:compress_form-Start compression").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        return at.session_state["compress_job"]

    # The interrupted run: stopped after its first checkpoint; the server "dies" before it
    # could record the end (the record says "started", by a server that is gone).
    first = start(session(sid))
    wait(first, lambda j: (j.latest("step") or {}).get("step", 0) > runs.CHECKPOINT_EVERY)
    first.stop()
    wait(first)
    (record,) = (space / "sessions" / sid / "runs").glob("*.json")
    stopped_at = runs.checkpoint_step(json.loads(record.read_text())["checkpoint"])
    assert runs.CHECKPOINT_EVERY < stopped_at < steps
    runs.update(record, status="started", server="4242-1.000")

    at = session(sid)                                           # the same URL, a new server
    offer = [w.value for w in at.warning if "interrupted run" in w.value]
    assert offer and f"stopped at step {stopped_at} of {steps}" in offer[0]
    at.button(key="resume_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    resumed = wait(at.session_state["compress_job"])
    assert resumed.status == "done", resumed.error
    assert [e["step"] for e in resumed.events_since(0, "step")] == \
        list(range(stopped_at + 1, steps + 1))                  # only the remaining steps
    saved = json.loads(record.read_text())
    assert saved["status"] == "done" and saved["plan"]["layers"] == \
        resumed.result.plan.to_dict()["layers"]
    at.run()
    assert not [w for w in at.warning if "interrupted run" in w.value]    # nothing left

    monkeypatch.setenv("LLRC_STUDIO_WORKSPACE", str(tmp_path / "unbroken"))
    unbroken = wait(start(session()))
    assert unbroken.status == "done" and len(unbroken.events_since(0, "step")) == steps
    assert resumed.result.plan.to_dict()["layers"] == unbroken.result.plan.to_dict()["layers"]


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

    from llrc_core import export
    _, space, _ = ws
    app.switch_page("pages/compress.py").run()
    app.selectbox(key="compress_method").set_value("uniform").run()
    app.number_input(key="n_eval").set_value(0)
    app.button(key="FormSubmitter:compress_form-Start compression").click().run()
    for key in ("compress_job", "export_job"):
        if key == "export_job":                         # the disk fills while writing
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(export, "save_file", full)
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
