"""Load bench of a hosted studio: N concurrent sessions browse its pages while compression jobs
run; page response p50/p95 for pages that start no job, and the server's peak memory.

    python bench/load.py                   # 20 browsing sessions + 2 compressing, own server
    python bench/load.py --smoke           # 3 sessions, 2 page loads each, 1 short job
    python bench/load.py --url http://host:8501 --pid 1234   # a server already running

Each session speaks Streamlit's own websocket protocol (``/_stcore/stream``, the protobuf
``BackMsg``/``ForwardMsg`` the browser sends and receives): a page response is the time from
asking for a page (``rerun_script``) to the server's ``script_finished``, i.e. the script run
that builds the page, all its elements sent. Hand-written: no library speaks this protocol
(``AppTest`` runs the script in-process, not against a server), and a real browser per session
(Playwright) would spend the 2 cores rendering charts instead of measuring the server.

Job sessions open the Compress page and start an LLRC run (queue: one runs, the others wait)
before the browsing sessions start; browsing sessions visit the pages in turn (each starts at
another page) with a random pause between pages (0.5x to 1.5x ``--think``), like a visitor
reading. Memory: the resident memory (RSS) of the server process and its children, sampled
every 0.2 s; peak reported. Job sessions refresh their live panel as a browser does (the
fragment rerun the server asks for every second); the last lines say where the jobs were
when browsing ended.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
BROWSE = ("Model", "Spectra", "Compress", "Compare", "Export")      # pages that start no job
FINISHED = {ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR}


class Session:
    """One visitor: a websocket to the server; ``page(name)`` runs a page and times it."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.pages: dict[str, str] = {}          # page name -> page_script_hash
        self.widgets: dict[str, tuple[str, str]] = {}   # label -> (widget id, element type)
        self.kinds: set[str] = set()              # element types of the last page
        self.status: list[str] = []               # its progress and info texts
        self.page_hash, self.auto = "", None      # the page shown; its fragment's refresh
        self.refreshes = 0
        self.errors: list[str] = []

    async def __aenter__(self):
        ws_url = self.url.replace("http", "ws", 1) + "/_stcore/stream"
        self.ws = await connect(ws_url, subprotocols=["streamlit"], max_size=2 ** 28,
                                open_timeout=60, ping_interval=None)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def page(self, name: str | None = None, widgets: list | None = None) -> float:
        """Run page ``name`` (the default page when None) with ``widgets`` (WidgetState
        dicts); return the seconds until the server finished the script run."""
        msg = BackMsg()
        state = msg.rerun_script
        state.query_string = f"s={self.token}"
        if name is not None:
            state.page_script_hash = self.page_hash = self.pages[name]
        for w in widgets or []:
            state.widget_states.widgets.add(**w)
        self.widgets, self.kinds, self.status = {}, set(), []
        t0 = time.perf_counter()
        await self.ws.send(msg.SerializeToString())
        while True:
            fwd = ForwardMsg()
            fwd.ParseFromString(await asyncio.wait_for(self.ws.recv(), 600))
            kind = fwd.WhichOneof("type")
            if kind == "navigation":
                self.pages = {p.page_name: p.page_script_hash for p in fwd.navigation.app_pages}
            elif kind == "delta" and fwd.delta.WhichOneof("type") == "new_element":
                self._element(fwd.delta.new_element)
            elif kind == "auto_rerun":
                self.auto = (fwd.auto_rerun.interval, fwd.auto_rerun.fragment_id)
            elif kind == "script_finished" and fwd.script_finished in FINISHED:
                return time.perf_counter() - t0

    def _element(self, element) -> None:
        kind = element.WhichOneof("type")
        self.kinds.add(kind)
        if kind == "exception":
            self.errors.append(element.exception.message)
        elif kind == "alert" and element.alert.format == element.alert.ERROR:
            self.errors.append(element.alert.body)
        elif kind == "alert" or kind == "progress":
            self.status.append(element.alert.body if kind == "alert" else element.progress.text)
        elif kind in ("number_input", "button"):
            proto = getattr(element, kind)
            self.widgets[proto.label] = (proto.id, kind)

    def widget(self, label: str, value) -> dict:
        wid, kind = self.widgets[label]
        if kind == "button":
            return {"id": wid, "trigger_value": True}
        return {"id": wid, "int_value": int(value)}

    async def watch(self) -> None:
        """What a browser does with a job's live panel: rerun its fragment every ``interval``
        seconds (as the server asked, ``auto_rerun``), reading whatever comes back."""
        async def tick():
            interval, fragment = self.auto
            while True:
                await asyncio.sleep(interval)
                msg = BackMsg()
                msg.rerun_script.query_string = f"s={self.token}"
                msg.rerun_script.page_script_hash = self.page_hash
                msg.rerun_script.fragment_id, msg.rerun_script.is_auto_rerun = fragment, True
                await self.ws.send(msg.SerializeToString())
                self.refreshes += 1
        ticker = asyncio.create_task(tick()) if self.auto else None
        try:
            async for _ in self.ws:
                pass
        except Exception:  # noqa: BLE001 -- closed at the end of the bench
            pass
        finally:
            if ticker is not None:
                ticker.cancel()


def token() -> str:
    return os.urandom(16).hex()


async def start_job(url: str, steps: int, i: int) -> Session:
    """A session that opens Compress and starts an LLRC run of ``steps`` steps (kept open:
    closing it would stop the job)."""
    s = Session(url, token())
    await s.__aenter__()
    await s.page()
    await s.page("Compress")
    values = {"steps": steps + i, "hold_steps": steps + i, "batch_size": 2, "mask_every": 0,
              "Perplexity windows (WikiText-2 test, 256 tokens each; 0 skips)": 0}
    widgets = [s.widget(label, v) for label, v in values.items() if label in s.widgets]
    await s.page("Compress", widgets + [s.widget("Start compression", True)])
    s.watcher = asyncio.create_task(s.watch())
    return s


async def browse(url: str, loads: int, think: float, offset: int, times: dict, first: list,
                 errors: list) -> None:
    pause = random.Random(offset)                 # visitors out of step, reproducibly
    await asyncio.sleep(pause.uniform(0, think))
    async with Session(url, token()) as s:
        first.append(await s.page())              # the default page: calibrates the session
        for k in range(loads):
            name = BROWSE[(offset + k) % len(BROWSE)]
            await asyncio.sleep(pause.uniform(0.5 * think, 1.5 * think))
            times.setdefault(name, []).append(await s.page(name))
        errors.extend(s.errors)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


class Memory(threading.Thread):
    """Peak RSS of a process tree, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self.done.wait(0.2)


def serve(workspace: Path, threads: int, extra=()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "LLRC_STUDIO_WORKSPACE": str(workspace)}
    log = open(workspace / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.headless", "true", "--server.port", str(port),
                             "--server.fileWatcherType", "none",
                             "--browser.gatherUsageStats", "false", *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"streamlit did not start; see {workspace / 'streamlit.log'}")


async def bench(args, url: str, memory: Memory) -> dict:
    # Warm the shared caches a visitor's page view reuses (model, svd decomposition of the
    # Spectra page) outside the timing, as a server that has run a while has them.
    async with Session(url, token()) as warm:
        await warm.page()
        await warm.page("Spectra")
        while "plotly_chart" not in warm.kinds:    # its decomposition job has not ended
            await asyncio.sleep(2)
            await warm.page("Spectra")
    jobs = [await start_job(url, args.steps, i) for i in range(args.jobs)]
    times, first, errors = {}, [], []
    t0 = time.time()
    await asyncio.gather(*(browse(url, args.loads, args.think, i, times, first, errors)
                           for i in range(args.sessions)))
    seconds = time.time() - t0
    at_end = []                                   # the jobs were running all along
    for s in jobs:
        s.watcher.cancel()
        await s.page("Compress")
        at_end.append(f"{s.status[0] if s.status else '(no job panel)'} "
                      f"({s.refreshes} live-panel refreshes)")
        errors.extend(s.errors)
        await s.__aexit__()
    every = [t for v in times.values() for t in v]
    rows = [{"page": name, "n": len(v), "p50": pct(v, 50), "p95": pct(v, 95), "max": max(v)}
            for name, v in sorted(times.items())]
    rows.append({"page": "all (no job)", "n": len(every), "p50": pct(every, 50),
                 "p95": pct(every, 95), "max": max(every)})
    rows.append({"page": "first page of a session", "n": len(first), "p50": pct(first, 50),
                 "p95": pct(first, 95), "max": max(first)})
    return {"sessions": args.sessions, "jobs": args.jobs, "loads": args.loads,
            "think_s": args.think, "seconds": seconds, "rows": rows,
            "peak_rss_gib": memory.peak / 2 ** 30, "errors": errors, "jobs_at_end": at_end}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20, help="browsing sessions at once")
    p.add_argument("--loads", type=int, default=20, help="page loads per browsing session")
    p.add_argument("--jobs", type=int, default=2, help="sessions running an LLRC compression")
    p.add_argument("--steps", type=int, default=300, help="training steps of each job")
    p.add_argument("--think", type=float, default=2.0,
                   help="mean seconds between page loads (uniform, 0.5x to 1.5x)")
    p.add_argument("--threads", type=int, default=1, help="server's OMP_NUM_THREADS")
    p.add_argument("--smoke", action="store_true", help="3 sessions, 2 loads, 1 job of 20 steps")
    p.add_argument("--url", help="a running studio (default: start one on a fresh workspace)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid (for its memory)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--streamlit", action="append", default=[], metavar="--SECTION.OPTION=VALUE",
                   help="a Streamlit option for the started server (repeatable), e.g. "
                        "--streamlit=--runner.postScriptGC=true")
    args = p.parse_args(argv)
    if args.smoke:
        args.sessions, args.loads, args.jobs, args.steps = 3, 2, 1, 20
    workspace, proc = None, None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        workspace = Path(tempfile.mkdtemp(prefix="llrc-load-"))
        proc, url = serve(workspace, args.threads, args.streamlit)
        pid = proc.pid
    memory = Memory(pid) if pid else None
    if memory:
        memory.start()
    try:
        result = asyncio.run(bench(args, url, memory or Memory(os.getpid())))
    finally:
        if memory:
            memory.done.set()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(workspace, ignore_errors=True)
    print(f"{result['sessions']} browsing sessions x {result['loads']} page loads, "
          f"{result['jobs']} compression jobs, {result['seconds']:.0f} s; server peak RSS "
          f"{result['peak_rss_gib']:.2f} GiB; page errors: {len(result['errors'])}")
    for i, text in enumerate(result["jobs_at_end"]):
        print(f"job {i} when browsing ended: {text}")
    print("| page | loads | p50 s | p95 s | max s |\n|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['page']} | {r['n']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
