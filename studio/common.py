"""What every page shares: paths, the cached base model and decompositions, per-session state,
and an error box that turns exceptions into messages.

Rules: ``st.cache_resource`` objects are shared by every browser session and are never
mutated (compressions work on deep copies, see ``llrc_core.workflow``); everything a session
owns (calibration windows, jobs, results) lives in ``st.session_state``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import traceback
from contextlib import contextmanager
from pathlib import Path

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


@st.cache_resource(show_spinner=False, max_entries=6)
def decomposition(model_key: tuple, calib_key: str, method: str, _base, _windows):
    """Factors of every target (read-only, shared); hooks run on a copy of the base model."""
    return decompose_copy(_base, method, None if method == "svd" else _windows)


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


def checkpoint_path(decomposition: str, method: str, options: dict) -> Path:
    """The workspace's checkpoint of one exact learned run: this model and calibration, this
    decomposition, method and options. Kept after the run (and across server restarts), so
    starting the same run again resumes it to the same plan."""
    key = json.dumps([model_key(), st.session_state["calib"]["key"], decomposition, method,
                      sorted(options.items())], default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return workspace.workspace() / "checkpoints" / f"{method}-{digest}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint holds (0 when there is none)."""
    if not Path(path).is_file():
        return 0
    return int(torch.load(path, weights_only=True, map_location="cpu")["step"])


def waiting_text(job) -> str:
    """What a queued job's session sees."""
    return (f"Waiting for a free slot: place {job.position} in line (other sessions' jobs run "
            f"first; at most {job.queue.slots} at once) - press Stop to leave the line.")


# --- per-session state ---------------------------------------------------------------------------
def model_key() -> tuple | None:
    return st.session_state.get("model_key")


def session_id() -> str:
    return st.session_state.setdefault("session_id", workspace.new_session_id())


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


def set_calibration(calib: dict) -> None:
    """Token windows for this session from ``calib`` = kind (file/upload/hub/selfgen), path or
    dataset name, n_samples, seq_len."""
    loaded = current()
    src = {"file": calib.get("path"), "upload": calib.get("path"), "hub": calib.get("dataset"),
           "selfgen": "selfgen"}[calib["kind"]]
    if calib["kind"] in ("file", "upload"):
        workspace.readable(src, "calibration file")
    if calib["kind"] == "selfgen":   # generation touches config flags: use a copy
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    windows = calibrate(loaded, src, int(calib["n_samples"]), int(calib["seq_len"]))
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


def decomposed(method: str):
    loaded = current()
    return decomposition(model_key(), st.session_state["calib"]["key"], method, loaded.model,
                         windows())


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
