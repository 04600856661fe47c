"""End to end in headless Debian Chromium (Python Playwright): start the app on a free port,
load the demo model, open the spectra, run a short LLRC compression from the browser, see the
mask heatmap and the loss chart change between two moments, stop it, export and reload.
Screenshots of every page go to ``test-artifacts/``.

Needs ``/usr/bin/chromium`` (apt ``chromium``) and ``pip install playwright``; never
``playwright install``. Skips only when one of the two is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, WIKI_TEST

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
WORKSPACE = ARTIFACTS / "workspace"          # the served studio's LLRC_STUDIO_WORKSPACE
server_pid: list[int] = []                   # the streamlit process (peak memory)
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:   # pragma: no cover - the CI script installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright missing (pip install)"),
]

# Plotly keeps each chart's data on its div: read titles, trace names and sizes, and a digest
# of the mask probabilities.
FIGURES_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
  title: ((gd.layout.title && gd.layout.title.text) || '').replace(/<[^>]+>/g, ''),
  traces: gd.data.map(t => ({name: t.name || '', type: t.type,
                             n: (t.x || t.y || []).length,
                             z: t.z ? JSON.stringify(t.z) : null}))}))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(workspace: Path, log_name: str = "streamlit.log") -> tuple[subprocess.Popen, str]:
    """Start the studio on a free port with ``workspace``; return the process and its URL."""
    if not WIKI_TEST.exists():
        pytest.fail("shared data missing: ../shared/data/wikitext-2")
    port = free_port()
    # One intra-op thread: predictable on a shared 2-core runner (threads thrash under load).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "LLRC_STUDIO_WORKSPACE": str(workspace)}
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / log_name, "w") as log:      # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                                 "--server.headless", "true", "--server.port", str(port),
                                 "--server.fileWatcherType", "none",   # others edit the tree
                                 "--browser.gatherUsageStats", "false"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"streamlit did not start; see test-artifacts/{log_name}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server():
    shutil.rmtree(WORKSPACE, ignore_errors=True)
    proc, url = serve(WORKSPACE)
    server_pid[:] = [proc.pid]
    try:
        yield url
    finally:
        stop(proc)


def figures(page) -> dict[str, dict]:
    return {f["title"]: f for f in page.evaluate(FIGURES_JS)}


def find(figs: dict, prefix: str) -> dict | None:
    return next((f for t, f in figs.items() if t.startswith(prefix)), None)


def wait_for(page, predicate, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def shot(page, name: str) -> bytes:
    page.wait_for_timeout(300)
    return page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def nav(page, title: str):
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()


def set_number(page, label: str, value):
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def test_browser_end_to_end(server, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1800})
        page.set_default_timeout(180_000)
        expect.set_options(timeout=180_000)    # first loads and decompositions are slow on CPU
        try:
            run_flow(page, server, tmp_path)
        finally:
            shot(page, "last")
            browser.close()


def run_flow(page, url: str, tmp_path: Path):
    # Model: the demo model loads by default.
    page.goto(url)
    expect(page.get_by_text("Target layers", exact=True)).to_be_visible()
    expect(page.get_by_test_id("stMetricValue").nth(2)).to_have_text("36")
    shot(page, "1-model")

    # Spectra: four charts with titled axes.
    nav(page, "Spectra")
    figs = wait_for(page, lambda: len(figures(page)) >= 4 and figures(page), what="4 charts")
    spec = find(figs, "Singular value spectra")
    assert spec, list(figs)
    assert len(spec["traces"]) == 6 and all(t["n"] == 384 for t in spec["traces"])
    assert find(figs, "Effective rank by block")["traces"][0]["type"] == "heatmap"
    shot(page, "2-spectra")

    # Compress: a short LLRC run started from the browser.
    nav(page, "Compress")
    expect(page.get_by_label("steps", exact=True)).to_be_visible()
    set_number(page, "steps", 400)
    page.get_by_text("More options", exact=True).click()     # expander with the rest
    set_number(page, "mask_every", 2)
    set_number(page, "batch_size", 2)
    set_number(page, "Perplexity windows (WikiText-2 test, 256 tokens each; 0 skips)", 2)
    page.get_by_role("button", name="Start compression").click()

    def moment():
        figs = figures(page)
        masks, loss = find(figs, "Mask"), find(figs, "Loss terms")
        if masks and loss and loss["traces"][0]["n"] >= 2:
            return masks, loss
        return None

    masks1, loss1 = wait_for(page, moment, 240, "mask heatmap and loss chart")
    png1 = shot(page, "3-compress-early")
    masks2, loss2 = wait_for(page, lambda: (m := moment()) and m[0]["title"] != masks1["title"]
                             and m[1]["traces"][0]["n"] > loss1["traces"][0]["n"] and m,
                             180, "the charts to change")
    # The painted page follows the charts' data; on a loaded runner the paint can lag the
    # data by a few seconds, so the later screenshot is retaken until it differs.
    wait_for(page, lambda: shot(page, "4-compress-later") != png1,
             60, "the painted page to change")
    step = lambda m: int(m["title"].rsplit("step ", 1)[1].rstrip(")"))  # noqa: E731
    assert step(masks2) > step(masks1)
    assert masks2["traces"][0]["z"] != masks1["traces"][0]["z"]      # probabilities moved
    assert [t["name"] for t in loss2["traces"]] == ["loss", "loss_compression", "loss_distill",
                                                   "loss_tv", "alpha(t)"]

    # The app's Stop button, not the one Streamlit's status widget shows while a rerun is slow.
    page.locator('button[kind="secondary"]', has_text="Stop").click()
    expect(page.get_by_text("Stopped after")).to_be_visible(timeout=180_000)
    expect(page.get_by_text("Perplexity after")).to_be_visible()
    shot(page, "5-compress-stopped")

    # Compare: the page and its form (the grid itself is covered by test_app).
    nav(page, "Compare")
    expect(page.get_by_role("button", name="Run comparison")).to_be_visible()
    shot(page, "6-compare")

    # Export: save, zip, reload and check.
    nav(page, "Export")
    box = page.get_by_label("Folder name (in your workspace)", exact=True)
    box.fill("export")
    box.press("Tab")
    page.get_by_role("button", name="Save to folder").click()
    expect(page.get_by_role("button", name="Download folder (zip)")).to_be_visible()
    (out,) = WORKSPACE.glob("sessions/*/exports/export")       # the session's own folder
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    plan = json.loads((out / "rank_plan.json").read_text())
    assert plan["method"] == "llrc" and plan["meta"]
    page.get_by_role("button", name="Reload and check outputs").click()
    expect(page.get_by_text("The reloaded model gives the same outputs.")).to_be_visible()
    shot(page, "7-export")


def peak_rss_gib(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in GiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = int(next(line.split()[1] for line in status.splitlines()
                   if line.startswith("VmHWM")))
    return kib / 2 ** 20


HEAVY = os.environ.get("LLRC_HEAVY_TESTS") == "1"


@pytest.mark.parametrize("sessions", [2, pytest.param(5, marks=pytest.mark.skipif(
    not HEAVY, reason="heavy variant: LLRC_HEAVY_TESTS=1"))])
def test_sessions_share_one_queue(server, sessions):
    """Several visitors at once: each starts an LLRC run; with one slot (CPU default) the runs
    wait their turn, finish in the order they were started, each page shows its own run and no
    exception, and the server's peak memory stays bounded. Short runs without the mask heatmap
    (the queue is what is tested; the live charts are the end-to-end test's)."""
    steps, t_start = 10 + sessions, time.time()   # no run of another variant resumed here
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        expect.set_options(timeout=180_000)
        pages = []
        try:
            for i in range(sessions):          # runs differ (steps): none resumes another's
                page = browser.new_context(viewport={"width": 1400, "height": 1400}).new_page()
                page.set_default_timeout(180_000)
                page.goto(server)
                expect(page.get_by_text("Target layers", exact=True)).to_be_visible()
                nav(page, "Compress")
                expect(page.get_by_label("steps", exact=True)).to_be_visible()
                set_number(page, "steps", steps + i)
                set_number(page, "hold_steps", steps + i)
                set_number(page, "mask_every", 0)
                page.get_by_text("More options", exact=True).click()
                set_number(page, "batch_size", 2)
                set_number(page, "Perplexity windows (WikiText-2 test, 256 tokens each; 0 skips)",
                           0)
                pages.append(page)
            # The first run trains; each later one, started while it trains, waits its turn.
            for i, page in enumerate(pages):
                page.get_by_role("button", name="Start compression").click()
                expect(page.get_by_text(re.compile(rf"step \d+ of {steps}\b") if i == 0 else
                                        f"Waiting for a free slot: place {i} in line")
                       ).to_be_visible()
            done: list[int] = []
            t0 = time.time()
            while len(done) < sessions and time.time() - t0 < 300 + 200 * sessions:
                for i, page in enumerate(pages):
                    if i not in done and page.get_by_text("Done after").count():
                        done.append(i)
                pages[0].wait_for_timeout(300)
            assert done == list(range(sessions)), done          # first come, first served
            for i, page in enumerate(pages):
                assert page.get_by_test_id("stException").count() == 0
                expect(page.get_by_text(f"({steps + i} steps)")).to_be_visible()
        finally:
            for i, page in enumerate(pages):
                shot(page, f"queue-{sessions}-{i}")
            browser.close()
    peak = peak_rss_gib(server_pid[0])
    print(f"{sessions} sessions: {time.time() - t_start:.0f} s, server peak RSS {peak:.2f} GiB")
    # Peak of the server's lifetime (VmHWM), measured on the 2-core CPU dev machine shared
    # with other jobs: 2 sessions after the end-to-end test 1.45-1.51 GiB; 5 sessions alone
    # 1.51-1.67 GiB (132-164 s), after the other two tests in one server 1.97 GiB (81 s). One
    # queue slot keeps one private model copy training at a time. Bounds: measured + ~30 %.
    assert peak < (2.0 if sessions == 2 else 2.5)
