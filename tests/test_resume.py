"""Nothing is lost when the server restarts or the visitor goes away: a session's id travels
in its URL (strictly checked before it names a folder), a learned run checkpoints and is
recorded in the session's folder, and the Compress page offers an interrupted run (Resume to
the plan of an unbroken run, or Discard). AppTest; the real kill-and-restart in a browser is
``test_browser_restart.py``."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))   # the app's studio/ helpers


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


def _interrupted_run(space, sid: str, step: int, **fields):
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
