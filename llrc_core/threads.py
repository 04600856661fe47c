"""Intra-op thread count for the CPU loops of rank selection (training steps, STRS passes).

An op that runs on ``n`` threads ends at a barrier that waits for the slowest of them. On a
CPU shared with other jobs one of those threads is often off its core, so each of the
thousand-odd ops of a training step can wait out a scheduler time slice; on free cores more
threads do more work. So the count is measured, not guessed: ``ThreadChooser`` times a short
probe (a few GEMMs and elementwise ops shaped like a step's) on each candidate count, keeps
the fastest, and probes again as the load changes.

Measured with ``bench/live_speed.py`` on the 2-core dev machine (its section of
``bench/README.md``), demo model, LLRC at the studio's defaults: on idle cores 0.26 s a step
on 2 threads against 0.45 s on 1, and the chooser kept 2; with two busy processes on the
cores (``--load 2``) 0.98 and 1.53 s a step on 2 threads against 0.65 s on 1, and the
chooser switched to 1 (0.65 and 0.70 s).

The count changes how long the maths takes, not its result. LLRC's distillation distances are
summed on one thread (``selectors/learned.py``) because a sum over a whole tensor splits by
thread count: in the same bench, the code before that change gave losses on 2 threads that
differed from those on 1 by up to 3.6e-7 within 40 steps, and with it the 40 steps are the
same bits. ``tests/test_live_speed.py`` (slow) runs 12 LLRC steps and an STRS score on the
demo model on 1 and on 2 threads and asserts the same losses, kept counts, plan and score
bit for bit; it fails when the distances are summed on all threads. ``LLRC_THREADS=<n>`` pins
the count for these loops; unset or ``auto`` measures. The upper bound is the count torch has
when the loop starts (``OMP_NUM_THREADS``, ``torch.set_num_threads``).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

ENV = "LLRC_THREADS"


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then put the previous count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread():
    """Tiny sequential ops (a GRU over a few dozen steps, an optimiser step over mask logits)
    on one thread: with more, each op pays a barrier (see the module docstring)."""
    return pinned_threads(1)


def probe_seconds(threads: int, reps: int = 4) -> float:
    """Wall time of a small workload shaped like a training step's ops (512 x 384 x 384
    GEMMs, elementwise ops over their outputs) on ``threads`` threads: ~6 ms on an idle core."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 384, generator=gen)                      # (T, n)
    b = torch.randn(384, 384, generator=gen)                      # (n, m)
    with pinned_threads(threads), torch.inference_mode():
        t = time.perf_counter()
        for _ in range(reps):
            c = a @ b                                             # (T, m)
            c.mul_(0.5).add_(a)
        return time.perf_counter() - t


def pinned_from_env() -> int | None:
    """``LLRC_THREADS`` as a count, ``None`` when unset or ``auto``."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV} must be 'auto' or a thread count >= 1, got {value!r}; e.g. "
                         f"{ENV}=1 on a CPU shared with other jobs")
    return int(value)


class ThreadChooser:
    """Keeps the fastest of a few thread counts for a CPU loop, measured as the loop runs.

    Call ``tick()`` before each unit of work (a step, a pass): when a probe is due it times
    ``probe`` twice on each candidate count (1, half and all of the starting count),
    interleaved, and sets the fastest by its best time. A larger count must beat a smaller one
    by ``margin`` (on a near tie the fewer threads leave the other cores to other jobs).

    Probes are due at the first tick, then ``every`` seconds while several threads run (a
    load arriving makes them many times slower: found within ``every``); on one thread the
    interval doubles after each probe that keeps it, up to ``every_max`` (the worst a late
    switch costs there is the idle cores' speed-up). ``close()`` (or leaving the ``with``
    block) restores the starting count. On a GPU, or with one thread to start with, it does
    nothing.
    """

    def __init__(self, device: torch.device | str = "cpu", every: float = 10.0,
                 every_max: float = 80.0, margin: float = 0.85,
                 probe: Callable[[int], float] = probe_seconds,
                 clock: Callable[[], float] = time.monotonic, pinned: int | None = None):
        self.start = torch.get_num_threads()
        self.pinned = pinned if pinned is not None else pinned_from_env()
        self.active = torch.device(device).type == "cpu"
        self.candidates = sorted({1, max(1, self.start // 2), self.start})
        self.every, self.every_max, self.margin = every, every_max, margin
        self.probe, self.clock = probe, clock
        self.current, self.next_probe, self.interval = self.start, None, every
        self.probes: list[dict[int, float]] = []       # probe seconds per count, each round
        self.units: dict[int, int] = {}                # units of work run per count

    def tick(self) -> int:
        """Before a unit of work: probe when due; returns the count the unit runs on."""
        if self.active:
            if self.pinned is not None:
                self._set(self.pinned)
            elif len(self.candidates) > 1 and (self.next_probe is None
                                               or self.clock() >= self.next_probe):
                before, chosen = self.current, self._fastest()
                self._set(chosen)
                kept_one = chosen == 1 and before == 1 and self.next_probe is not None
                self.interval = min(2 * self.interval, self.every_max) if kept_one \
                    else self.every
                self.next_probe = self.clock() + self.interval
        self.units[self.current] = self.units.get(self.current, 0) + 1
        return self.current

    def _fastest(self) -> int:
        times: dict[int, list[float]] = {n: [] for n in self.candidates}
        for _ in range(2):
            for n in self.candidates:
                times[n].append(self.probe(n))
        best_time = {n: min(t) for n, t in times.items()}
        self.probes.append(best_time)
        best = self.candidates[0]
        for n in self.candidates[1:]:
            if best_time[n] < self.margin * best_time[best]:
                best = n
        return best

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.current = n

    def close(self) -> None:
        if self.active and torch.get_num_threads() != self.start:
            torch.set_num_threads(self.start)

    def __enter__(self) -> "ThreadChooser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
