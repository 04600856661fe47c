"""The UI-agnostic helpers the studio uses: jobs (a worker thread's events, stop and errors)
and analysis (effective rank, energy, the grids the heatmaps draw)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from llrc_core import analysis
from llrc_core.jobs import start_job


def test_job_collects_events_from_worker_and_stops_on_request():
    def work(emit, should_stop):
        i = 0
        while not should_stop():
            emit({"type": "step", "step": i})
            i += 1
            time.sleep(0.002)
        return i

    job = start_job(work)
    while len(job) < 5:
        time.sleep(0.01)
    assert job.status == "running" and job.running
    job.stop()
    assert job.wait(5)
    assert job.status == "stopped" and job.error is None
    steps = [e["step"] for e in job.events_since(0, "step")]
    assert steps == list(range(job.result)) and job.latest("step")["step"] == job.result - 1
    assert job.events_since(3)[0]["step"] == 3


@pytest.mark.parametrize("exc, status, message", [
    (ValueError("ratio must be in (0, 1]"), "error", "ratio must be in (0, 1]"),
    (RuntimeError("boom"), "error", "RuntimeError: boom"),
])
def test_job_reports_errors_as_messages(exc, status, message):
    def work(emit, should_stop):
        emit({"type": "phase"})
        raise exc

    job = start_job(work)
    assert job.wait(5)
    assert (job.status, job.error, job.result) == (status, message, None)
    assert "Traceback" in job.traceback and len(job) == 1


def test_job_events_are_consistent_under_concurrent_readers():
    job = start_job(lambda emit, stop: [emit({"type": "x", "i": i}) for i in range(3000)])
    seen = []
    reader = threading.Thread(target=lambda: [seen.append(len(job.events_since(0)))
                                               for _ in range(200)])
    reader.start()
    job.wait(10)
    reader.join()
    assert job.status == "done" and len(job) == 3000
    assert seen == sorted(seen)   # snapshots only grow


@pytest.mark.parametrize("S, energy, eff, k", [
    ([1.0] * 8, 0.5, 8.0, 4),                      # flat: effective rank = r
    ([3.0, 0.0, 0.0], 0.99, 1.0, 1),               # one direction
    ([2.0, 1.0, 1.0, 1.0, 1.0], 0.5, None, 1),      # 4 / 8 of the energy in the first
    ([2.0, 1.0, 1.0, 1.0, 1.0], 0.75, None, 3),     # 4 + 1 + 1 = 6 of 8
])
def test_effective_rank_and_rank_for_energy(S, energy, eff, k):
    S = torch.tensor(S)
    if eff is not None:
        assert analysis.effective_rank(S) == pytest.approx(eff)
    assert analysis.rank_for_energy(S, energy) == k
    assert analysis.cumulative_energy(S)[-1].item() == pytest.approx(1.0)


def test_block_grid_and_mask_matrix_shapes():
    rows = [{"block": b, "module_type": m, "v": 10 * b + i}
            for b in (0, 1) for i, m in enumerate(("q", "k", "v"))]
    blocks, kinds, z = analysis.block_grid(rows[:-1], "v")
    assert (blocks, kinds) == ([0, 1], ["q", "k", "v"]) and z == [[0, 1, 2], [10, 11, None]]
    names, z = analysis.mask_matrix({"a": [0.5, 1.0, 0.25], "b": [1.0]})
    assert names == ["a", "b"] and z == [[0.5, 1.0, 0.25], [1.0, None, None]]


# --- the app ----------------------------------------------------------------------------------------
