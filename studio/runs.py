"""The learned runs a session started, kept on disk so that nothing is lost when the server
restarts or the visitor goes away: the Compress page offers to resume an interrupted one.

A learned run checkpoints into the workspace (``checkpoints/``, one file per exact run: model,
calibration, decomposition, method and options), so the same run started again, from any
session, resumes it to the same plan. Each run a session starts is also recorded in the
session's folder (``sessions/<id>/runs/<checkpoint stem>.json``, written atomically): what to
rebuild it from (model source, device, dtype, calibration, method, decomposition, options,
plumbing, perplexity windows, label), its checkpoint, the server process that started it and
its status:

* ``started``: submitted by server ``server`` (running there, or that server has died);
* ``done`` (with its plan), ``stopped`` (the visitor pressed Stop) or ``error``: ended;
* ``interrupted``: the visitor left and the job stopped, its progress in the checkpoint;
* ``discarded``: the visitor declined to resume it.

A run is offered for resuming when it is ``interrupted``, or ``started`` by a server that is
no longer this one, and its checkpoint exists. Streamlit-free: pages pass the folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from llrc_core.files import atomic_json
from studio import workspace

#: This server process (pid and start time: the same after a module reload, new after a
#: restart): a run "started" by another server died with it.
SERVER = f"{os.getpid()}-{workspace.STARTED:.3f}"
CHECKPOINT_EVERY = 10             # steps between a studio run's checkpoints (lost at most)
log = logging.getLogger("llrc_studio")


def checkpoint_path(model_key, calib_key: str, decomposition: str, method: str,
                    options: dict) -> Path:
    """The workspace's checkpoint of one exact learned run. Kept after the run (and across
    server restarts), so starting the same run again resumes it to the same plan."""
    key = json.dumps([model_key, calib_key, decomposition, method, sorted(options.items())],
                     default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return workspace.workspace() / "checkpoints" / f"{method}-{digest}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint holds (0 when there is none)."""
    if not Path(path).is_file():
        return 0
    return int(torch.load(path, weights_only=True, map_location="cpu")["step"])


def record(session: Path, run: dict) -> Path:
    """Record a run this session starts (``run`` holds ``checkpoint`` and what rebuilds it)."""
    path = session / "runs" / f"{Path(run['checkpoint']).stem}.json"
    atomic_json(path, {**run, "status": "started", "server": SERVER, "started": time.time()})
    return path


def update(path: Path, **fields) -> None:
    atomic_json(path, {**json.loads(path.read_text()), **fields})


def finish(path: Path, job) -> None:
    """How ``job`` ended, into its record (a ``Job``'s ``on_end``: runs on its worker)."""
    try:
        if job.status == "done":
            update(path, status="done", ended=time.time(), plan=job.result.plan.to_dict())
        elif job.status == "error":
            update(path, status="error", ended=time.time(), error=job.error)
        else:                  # stopped: by the visitor's Stop, or because the visitor left
            update(path, status="stopped" if job.stop_requested else "interrupted",
                   ended=time.time())
    except Exception:  # noqa: BLE001 -- a worker thread: log, never raise
        log.exception("could not record the end of run %s", path)


def interrupted(session: Path) -> dict | None:
    """This session's newest interrupted run whose checkpoint exists: its record with
    ``path`` (of the record) and ``step`` (where the checkpoint stopped); else None."""
    records = sorted((session / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    for path in records:
        try:
            run = json.loads(path.read_text())
            status, checkpoint = run["status"], Path(run["checkpoint"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable run record %s: skipped", path)
            continue
        offered = status == "interrupted" or (status == "started" and run.get("server") != SERVER)
        mine = checkpoint.parent == workspace.workspace() / "checkpoints"   # never elsewhere
        if offered and mine and checkpoint.is_file():
            return {**run, "path": str(path), "step": checkpoint_step(checkpoint)}
    return None
