"""A server killed in the middle of a learned run, in headless Debian Chromium: the same URL on
the restarted server offers the interrupted run ("stopped at step N of M"), Resume trains the
remaining steps from the checkpoint, and the plan equals the one the same run gives unbroken.

Same requirements as ``test_browser.py`` (``/usr/bin/chromium``, Python Playwright)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from test_browser import ARGS, ARTIFACTS, CHROMIUM, nav, serve, set_number, shot, stop

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:   # pragma: no cover - the CI script installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright missing (pip install)"),
]
# The studio checkpoints every 10 steps (studio.runs). The page shows a step after the trainer
# has run it, so the kill lands some steps later than the page says: 60 steps leave room for
# that lag (with 24, a fast machine once finished the run, and wrote its final checkpoint,
# before the kill).
STEPS, EVERY = 60, 10


def start_run(page, url: str) -> None:
    """Open the studio, go to Compress and start a short LLRC run."""
    page.goto(url)
    expect(page.get_by_text("Target layers", exact=True)).to_be_visible()
    nav(page, "Compress")
    expect(page.get_by_label("steps", exact=True)).to_be_visible()
    set_number(page, "steps", STEPS)
    set_number(page, "hold_steps", STEPS)
    set_number(page, "mask_every", 0)
    page.get_by_text("More options", exact=True).click()
    set_number(page, "batch_size", 2)
    set_number(page, "Perplexity windows (WikiText-2 test, 256 tokens each; 0 skips)", 0)
    page.get_by_role("button", name="Start compression").click()


def token(page) -> str:
    (sid,) = parse_qs(urlparse(page.url).query)["s"]
    assert re.fullmatch(r"[0-9a-f]{32}", sid), page.url
    return sid


def test_a_run_killed_with_its_server_resumes_on_the_same_url():
    workspace = ARTIFACTS / "workspace-restart"
    shutil.rmtree(workspace, ignore_errors=True)
    proc, url = serve(workspace, "streamlit-restart-1.log")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        expect.set_options(timeout=240_000)
        page = browser.new_context(viewport={"width": 1400, "height": 1400}).new_page()
        page.set_default_timeout(240_000)
        try:
            start_run(page, url)
            sid = token(page)                        # the session id travels in the URL
            expect(page.get_by_text(re.compile(rf"step (1[1-9]|2[0-9]) of {STEPS}\b"))
                   ).to_be_visible()
            proc.kill()                              # the server dies mid-run: no clean-up
            proc.wait(30)
            (ckpt,) = (workspace / "checkpoints").glob("llrc-*.pt")
            step = int(torch.load(ckpt, weights_only=True)["step"])
            assert step % EVERY == 0 and EVERY <= step < STEPS     # a checkpoint mid-run
            (record,) = (workspace / "sessions" / sid / "runs").glob("*.json")
            assert json.loads(record.read_text())["status"] == "started"

            proc, url = serve(workspace, "streamlit-restart-2.log")    # a new server
            page.goto(f"{url}/compress?s={sid}")
            expect(page.get_by_text(f"stopped at step {step} of {STEPS}")).to_be_visible()
            shot(page, "restart-1-offer")
            page.get_by_role("button", name="Resume").click()
            expect(page.get_by_text("Done after")).to_be_visible(timeout=400_000)
            expect(page.get_by_text(f"({STEPS} steps)")).to_be_visible()
            assert page.get_by_test_id("stException").count() == 0
            assert token(page) == sid
            shot(page, "restart-2-resumed")
            resumed = json.loads(record.read_text())
            assert resumed["status"] == "done"

            # The same run unbroken, from scratch (its checkpoint removed), in a new session.
            ckpt.unlink()
            other = browser.new_context(viewport={"width": 1400, "height": 1400}).new_page()
            other.set_default_timeout(240_000)
            start_run(other, url)
            expect(other.get_by_text("Done after")).to_be_visible(timeout=400_000)
            (again,) = (workspace / "sessions" / token(other) / "runs").glob("*.json")
            unbroken = json.loads(again.read_text())
            assert unbroken["status"] == "done" and unbroken["plan"]["meta"]["steps"] == STEPS
            assert resumed["plan"]["layers"] == unbroken["plan"]["layers"]
        finally:
            shot(page, "restart-last")
            browser.close()
            stop(proc)
