"""What every page shares: paths, the cached base model and decompositions, per-session state,
and an error box that turns exceptions into messages.

Rules: ``st.cache_resource`` objects are shared by every browser session and are never
mutated (compressions work on deep copies, see ``llrc_core.workflow``); everything a session
owns (calibration windows, jobs, results) lives in ``st.session_state``; heavy work runs as a
job of the shared queue (``studio.queued``), never in the script thread.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import re
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import cachetools
import streamlit as st
import torch

from llrc_core import calibrate, find_targets
from llrc_core.models import count_params, load_model
from llrc_core.workflow import decompose_copy
from studio import workspace

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo-model"
DATA = ROOT.parent / "shared" / "data"
WIKI_VALID = DATA / "wikitext-2" / "valid.txt"
WIKI_TEST = DATA / "wikitext-2" / "test.txt"
DEFAULT_CALIB = dict(kind="file" if WIKI_VALID.exists() else "selfgen", path=str(WIKI_VALID),
                     n_samples=16, seq_len=128)
#: Where the Compare page keeps its grids (one folder per model and calibration), shared by
#: every session: inside the workspace unless the operator names another folder.
RUNS = Path(os.environ.get("LLRC_STUDIO_RUNS") or workspace.workspace() / "compare")
log = logging.getLogger("llrc_studio")


@contextmanager
def error_box():
    """Show an exception as ``st.error`` (message only; the traceback goes to the log)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- Streamlit's rerun/stop are BaseException
        log.error("page error:\n%s", traceback.format_exc())
        st.error(f"{type(exc).__name__}: {exc}" if not _user_error(exc) else str(exc))


def _user_error(exc: Exception) -> bool:
    from llrc_core.errors import LLRCError
    return isinstance(exc, (LLRCError, ValueError, FileNotFoundError, FileExistsError))


# --- shared, read-only resources -----------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def base_model(source: str, device: str, dtype: str):
    """The loaded model for (source, device, dtype), shared by all sessions: never mutate it."""
    return load_model(source, device=device, dtype=dtype)


# The decompositions computed so far (the newest 6), shared read-only by every session. Not an
# st.cache_resource: a page must know whether one is ready (and show it at once) or must be
# computed by a queued job, which a cache_resource cannot tell without computing. The
# condition makes a second caller of the same key wait for the first instead of recomputing.
_DECOMPOSITIONS, _DECOMPOSING = cachetools.LRUCache(maxsize=6), threading.Condition()


def _decomposition_key(model_key, calib_key, method, *_):
    return cachetools.keys.hashkey(model_key, calib_key, method)


@cachetools.cached(_DECOMPOSITIONS, key=_decomposition_key, condition=_DECOMPOSING)
def decomposition(model_key: tuple, calib_key: str, method: str, base, windows):
    """Factors of every target (read-only, shared); hooks run on a copy of the base model.
    Heavy: called from a queued job (``decomposed``)."""
    return decompose_copy(base, method, None if method == "svd" else windows)


def ready_decomposition(model_key: tuple, calib_key: str, method: str):
    """The shared decomposition if it is computed already, else None (nothing computed)."""
    with _DECOMPOSING:
        return _DECOMPOSITIONS.get(_decomposition_key(model_key, calib_key, method))


@st.cache_resource(show_spinner=False)
def job_queue():
    """One queue for every session's heavy jobs (compressions, comparisons): at most
    ``LLRC_STUDIO_JOBS`` run at once (default one per GPU, one on CPU); the rest wait in
    order and show their place."""
    from llrc_core.jobs import JobQueue
    slots = int(os.environ.get("LLRC_STUDIO_JOBS") or max(1, torch.cuda.device_count()))
    return JobQueue(slots)


def owner_alive():
    """A callable telling whether this browser session is still connected (None outside a
    served session): a job started by a visitor who has gone away stops, and leaves the
    queue if it was waiting."""
    from streamlit.runtime import exists, get_instance
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    ctx = get_script_run_ctx()
    if ctx is None or not exists() or not get_instance().is_active_session(ctx.session_id):
        return None
    runtime, sid = get_instance(), ctx.session_id
    return lambda: runtime.is_active_session(sid)


def waiting_text(job) -> str:
    """What a queued job's session sees."""
    return (f"Waiting for a free slot: place {job.position} in line (other sessions' jobs run "
            f"first; at most {job.queue.slots} at once) - press Stop to leave the line.")


# --- per-session state ---------------------------------------------------------------------------
def model_key() -> tuple | None:
    return st.session_state.get("model_key")


def session_id() -> str:
    """This visitor's session id, kept in the URL (``?s=``): a reload, or the same URL opened
    after a server restart, finds the same session folder (its exports and recorded runs).
    A value that is not exactly a session id is ignored and replaced by a new one."""
    sid = st.session_state.get("session_id")
    if sid is None:
        given = st.query_params.get("s")
        sid = given if workspace.valid_session_id(given) else workspace.new_session_id()
        st.session_state["session_id"] = sid
    if st.query_params.get("s") != sid:       # page switches drop the query string
        st.query_params["s"] = sid
    return sid


def session_dir() -> Path:
    """This browser session's own folder in the workspace (uploads, exports)."""
    return workspace.session_dir(session_id())


def load_into_session(source: str, device: str = "auto", dtype: str = "auto",
                      calib: dict | None = None) -> None:
    """Load (or reuse) a base model and calibrate it for this session. A local folder must lie
    inside the studio's allowed roots (``workspace.readable``); Hub ids pass."""
    source = workspace.model_source(source)
    if calib and calib.get("kind") == "file":                  # checked before any loading
        workspace.readable(calib["path"], "calibration file")
    base_model(source, device, dtype)          # load (or reuse) the shared model
    st.session_state["model_key"] = (source, device, dtype)
    st.session_state["calib"] = None
    set_calibration(calib or DEFAULT_CALIB)


@st.cache_data(show_spinner=False, max_entries=16)
def _calibration(model_key: tuple, src: str, n: int, length: int, stamp, _loaded):
    """Calibration windows shared by the sessions with the same model, text and sizes (each
    gets its own copy); ``stamp`` makes a changed file (a new upload) read again."""
    return calibrate(_loaded, src, n, length)


def _stamp(src: str):
    """Size and time of a file, or of every file in a folder (None for a dataset name)."""
    path = Path(src)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) \
        if path.is_dir() else []
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files) or None


def set_calibration(calib: dict) -> None:
    """Token windows for this session from ``calib`` = kind (file/upload/hub/selfgen), path or
    dataset name, n_samples, seq_len."""
    loaded = current()
    src = {"file": calib.get("path"), "upload": calib.get("path"), "hub": calib.get("dataset"),
           "selfgen": "selfgen"}[calib["kind"]]
    if calib["kind"] in ("file", "upload"):
        workspace.readable(src, "calibration file")
    n, length = int(calib["n_samples"]), int(calib["seq_len"])
    if calib["kind"] == "selfgen":   # generation touches config flags: use a copy
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
        windows = calibrate(loaded, src, n, length)
    else:                            # the same text and sizes: tokenized once for everyone
        windows = _calibration(model_key(), src, n, length, _stamp(src), loaded)
    key = f"{calib['kind']}:{src}:{tuple(windows.shape)}:{int(windows.sum())}"
    st.session_state["calib"] = {**calib, "source": src, "key": key}
    st.session_state["windows"] = windows


def current():
    """The session's ``LoadedModel``; loads the demo model with default calibration if none."""
    if model_key() is None:
        with st.spinner("Loading the demo model ..."):
            load_into_session(str(DEMO))
    return base_model(*model_key())


def windows() -> torch.Tensor:
    current()
    return st.session_state["windows"]


def polish_ids(cfg) -> torch.Tensor:
    """The windows a polish (``PolishConfig`` ``cfg``) measures its loss on: from this
    session's calibration text (a file or an upload), windows spread over all of it as
    ``llrc compress --polish`` takes them; from a Hub set or generated text, the session's
    calibration windows themselves (fetching or generating more would be a second
    calibration)."""
    from llrc_core.polish import polish_windows
    loaded, calib = current(), st.session_state["calib"]
    if calib["kind"] in ("file", "upload"):
        return polish_windows(loaded, calib["source"], cfg)
    return windows()


def refit_ids(n: int) -> torch.Tensor:
    """``n`` fresh windows of this session's calibration text or dataset for the refit alone,
    as ``llrc compress --refit-windows`` draws them (``refit.refit_windows``). Generated
    calibration text has no more windows than it made: refused with the fix."""
    from llrc_core.refit import refit_windows
    loaded, calib, w = current(), st.session_state["calib"], windows()
    if calib["kind"] == "selfgen":
        raise ValueError("fresh refit windows are drawn from a calibration text or dataset; "
                         "this session generated its calibration: set the refit windows to 0 "
                         "(the calibration windows)")
    return refit_windows(loaded, calib["source"], n, int(w.shape[1]))


def decomposition_job(method: str):
    """A job function computing (or reusing) this session's decomposition by ``method``."""
    base, w = current().model, windows()
    key, calib = model_key(), st.session_state["calib"]["key"]
    return lambda emit, should_stop: decomposition(key, calib, method, base, w)


def decomposed(method: str):
    """This session's decomposition by ``method``: at once when ready; else computed by a
    queued job whose panel the page shows while it waits (the script stops there)."""
    from studio import queued
    current()
    key, calib = model_key(), st.session_state["calib"]["key"]
    ready = ready_decomposition(key, calib, method)
    if ready is not None:
        return ready
    return queued.result("decompose_job", decomposition_job(method), f"decompose-{method}",
                         f"Decomposing {len(targets())} layers ({method})",
                         inputs=(key, calib, method))


def targets():
    return find_targets(current().model)


def param_summary() -> dict:
    loaded = current()
    ts = targets()
    linear = sum(t.m * t.n for t in ts)
    total = count_params(loaded.model)
    return {"total": total, "linear": linear, "other": total - linear, "layers": len(ts)}


def results() -> dict:
    """Compressions this session made, by label: ``CompressionResult`` or plan-only dicts.

    A finished Compress job is registered here too, whichever page asks first: the Compress
    page does it when it sees the job end, but a user who navigates away at that moment
    interrupts that script run."""
    res = st.session_state.setdefault("results", {})
    job = st.session_state.get("compress_job")
    if (job is not None and not job.running and job.result is not None
            and st.session_state.get("compress_registered") is not job):
        st.session_state["compress_registered"] = job
        res[st.session_state["compress_label"]] = job.result
    return res


def upload_path(uploaded) -> str:
    """Write an uploaded calibration file into this session's workspace folder (size-checked;
    Streamlit's ``server.maxUploadSize`` bounds it first); return its path."""
    data = uploaded.getvalue()
    if len(data) > workspace.UPLOAD_LIMIT_MB * 2 ** 20:
        raise workspace.PathRefused(f"the upload is {len(data) / 2 ** 20:.1f} MB; the limit is "
                                    f"{workspace.UPLOAD_LIMIT_MB} MB")
    suffix = Path(uploaded.name).suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        suffix = ".txt"
    path = session_dir() / "uploads" / f"calibration{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def device_options() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@st.cache_resource(show_spinner=False, max_entries=4)
def _eval_ids(model_key: tuple, n_windows: int, seq_len: int, _tokenizer):
    from llrc_core import eval_windows
    return eval_windows(_tokenizer, WIKI_TEST, seq_len, n_windows)


def eval_ids(n_windows: int, seq_len: int) -> torch.Tensor:
    """The first ``n_windows`` WikiText-2 test windows (read-only, shared)."""
    if not WIKI_TEST.exists():
        raise FileNotFoundError(f"WikiText-2 test text not found at {WIKI_TEST}; set the "
                                "perplexity windows to 0 to skip the evaluation")
    return _eval_ids(model_key(), n_windows, seq_len, current().tokenizer)


def compare_dir(cfg) -> Path:
    """The Compare page's run folder for this session's model and calibration: cells cached
    there are reused by every later grid (and session) on the same model and calibration."""
    key = hashlib.sha256(repr((model_key(), st.session_state["calib"]["key"])).encode())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", Path(cfg.model).name).strip("-") or "model"
    return RUNS / f"{slug}-{key.hexdigest()[:10]}"
