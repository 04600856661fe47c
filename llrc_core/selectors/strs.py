"""STRS: ASVD's sensitivity-based truncation rank search.

1. Sensitivity table: for every target layer and candidate ratio ``r`` (a fraction of the
   layer's parameters, rank ``floor(r m n / (m + n))`` as in the ASVD code), replace only
   that layer by its truncation and score the model on the calibration windows. The score is
   calibration perplexity for a causal LM; for an encoder (no logits) it is the distillation
   analogue ``mean(1 - cos(h, h_dense))`` of the last hidden states. Lower is better.
2. Threshold search: each layer takes the smallest ``r`` whose score is at or below a
   threshold (dense if none); the smallest threshold whose plan fits the budget is found by
   bisection over the sorted scores, then ``land_on_budget`` lands on the target within one rank
   step, topping up the layers whose interpolated score is worst first.

Speed-ups that change nothing (the scores are bit-identical, ``tests/test_live_speed.py``):
the hidden states entering block ``b`` are computed once (``BlockRunner``); a candidate in
block ``b`` re-runs only blocks ``b..L-1`` and the head. This is generic: blocks ``0..b-1``
are swapped for a pass-through and a pre-hook on block ``b`` feeds it the cached hidden
states, so the model's own forward runs the rest. The cross-entropy goes one window at a
time (``losses.next_token_nll_sum``), and the CPU thread count is measured as the passes
run (``threads.py``): the demo model's full table (36 layers x 9 candidates, 32 x 128
tokens) went from an estimated 503 s to 367 s on idle cores and from 1,740 s to 1,169 s
with two busy processes on them (``bench/live_speed.py``, ``bench/README.md``). What is
left is the vocabulary projection (about two thirds of a pass's multiply-adds on the demo
model) and the blocks after the candidate. The table
is cached on disk under ``cache_dir`` (default ``$LLRC_CACHE_DIR`` or
``~/.cache/llrc_studio``), keyed by a hash of the model (class, config, a fingerprint of
every parameter), the decomposition (name and spectra), the calibration windows and the
candidates, so a second run does no sensitivity passes.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..apply import low_rank_from, swap_module_
from ..blocks import capture_block_inputs, inference_mode, run_block
from ..counting import break_even
from ..errors import Stopped
from ..files import atomic_json
from ..losses import next_token_nll_sum, ppl_of
from ..models import find_blocks, find_targets
from ..onload import named_weights, onloaded
from ..threads import ThreadChooser
from .base import SelectConfig, SelectionContext, land_on_budget, ranks_cost
from .registry import register_selector


@dataclass
class STRSConfig(SelectConfig):
    candidates: tuple = field(default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                              metadata={"help": "candidate parameter fractions per layer"})
    max_windows: int | None = field(default=None, metadata={
        "help": "calibration windows used for the sensitivity scores (None: all)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})

    def __post_init__(self):
        super().__post_init__()
        cands = tuple(sorted({float(c) for c in self.candidates}))
        if not cands or cands[0] <= 0 or cands[-1] >= 1:
            raise ValueError(f"candidates must be fractions in (0, 1), got {self.candidates!r}; "
                             "e.g. candidates=[0.2,0.4,0.6,0.8]")
        self.candidates = cands
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {self.max_windows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# --------------------------------------------------------------------------- fast forward
class _PassThrough(nn.Module):
    """Stands in for an earlier block: returns its hidden-state input unchanged."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self.as_tuple else h


class BlockRunner:
    """Hidden states entering every block, computed once; ``forward_from(b)`` runs the model
    from block ``b`` on (blocks before it are pass-throughs, block ``b`` reads the cache)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8):
        self.model = model
        _, self.blocks = find_blocks(model)
        self.batches = list(windows.split(batch_size))                 # each (B, T)
        with inference_mode(model):
            inputs = capture_block_inputs(model, self.blocks, self.batches)
            out = self.blocks[0](*inputs[0].args, **inputs[0].kwargs)
            self.as_tuple = isinstance(out, (tuple, list))
            self.hidden = [[inp.hidden for inp in inputs]]              # [block][batch] (B,T,d)
            for block in list(self.blocks)[:-1]:
                self.hidden.append([run_block(block, inp.with_hidden(h))
                                    for inp, h in zip(inputs, self.hidden[-1])])

    @contextmanager
    def _from_block(self, b: int, current: list[int]):
        originals = [self.blocks[i] for i in range(b)]
        for i in range(b):
            self.blocks[i] = _PassThrough(self.as_tuple)

        def feed(_module, args, kwargs):
            h = self.hidden[b][current[0]]
            if args:
                return (h,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        handle = self.blocks[b].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, blk in enumerate(originals):
                self.blocks[i] = blk

    def forward_from(self, b: int):
        """Model outputs per batch, computed from block ``b`` onwards."""
        device = next(self.model.parameters()).device
        current = [0]
        with inference_mode(self.model), self._from_block(b, current):
            for i, ids in enumerate(self.batches):
                current[0] = i
                yield self.model(input_ids=ids.to(device))


def _score_fn(runner: BlockRunner):
    """Lower-is-better score of a model output stream: ppl (LM) or 1 - cosine (encoder)."""
    ref = []
    for out in runner.forward_from(0):
        if getattr(out, "logits", None) is not None:
            ref = None
            break
        ref.append(out[0].float())                                      # (B, T, d) dense

    def score(outputs) -> float:
        total, count = 0.0, 0
        for i, out in enumerate(outputs):
            ids = runner.batches[i].to(out[0].device)
            if ref is None:
                total += next_token_nll_sum(out.logits, ids).item()   # (B, T, V) logits
                count += ids[:, 1:].numel()
            else:
                cos = F.cosine_similarity(out[0].float(), ref[i], dim=-1)   # (B, T)
                total += (1 - cos).sum().item()
                count += cos.numel()
        mean = total / count
        return ppl_of(mean) if ref is None else mean
    return score


# --------------------------------------------------------------------------- the table
def candidate_rank(m: int, n: int, r: float) -> int:
    return max(1, math.floor(r * m * n / (m + n)))


def passes_needed(targets, candidates) -> int:
    """Sensitivity passes of a table: the (target, candidate) pairs below break-even (a
    candidate at or above it is dense, scored as the model is)."""
    return sum(1 for t in targets for r in candidates
               if candidate_rank(t.m, t.n, r) < break_even(t.m, t.n))


def sensitivity_table(model, factors, windows, candidates, batch_size=8, callback=None,
                      should_stop=lambda: False) -> tuple[dict, float, int]:
    """``({layer: {str(r): score}}, dense score, passes)`` using the block cache; the CPU
    thread count is measured as the passes run (``threads.py``)."""
    with ThreadChooser(next(model.parameters()).device) as threads:
        threads.tick()
        return _table(model, factors, windows, candidates, batch_size, callback, should_stop,
                      threads)


def _table(model, factors, windows, candidates, batch_size, callback, should_stop, threads):
    targets = [t for t in find_targets(model) if t.name in factors]
    runner = BlockRunner(model, windows, batch_size)
    score = _score_fn(runner)
    base = score(runner.forward_from(0))
    table, passes, t0 = {}, 0, time.time()
    total = passes_needed(targets, candidates)
    for t in targets:
        row = {}
        for r in candidates:
            k = candidate_rank(t.m, t.n, r)
            if k >= break_even(t.m, t.n):
                row[str(r)] = base                                      # dense: unchanged
                continue
            if should_stop():
                raise Stopped("STRS stopped before its sensitivity table was complete")
            threads.tick()
            old = model.get_submodule(t.name)
            with onloaded(old):               # sequentially onloaded: the device and bias
                new = low_rank_from(old, factors[t.name], list(range(k)))
            swap_module_(model, t.name, new)
            try:
                row[str(r)] = score(runner.forward_from(t.block))
            finally:
                swap_module_(model, t.name, old)
            passes += 1
            if callback is not None:
                callback({"type": "sensitivity", "layer": t.name, "ratio": r, "score": row[str(r)],
                          "done": passes, "total": total, "seconds": time.time() - t0,
                          "threads": threads.current})
        table[t.name] = row
    return table, base, passes


def cache_key(model, decomposition: str, factors, windows, candidates) -> str:
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(type(model).__name__.encode())
    h.update((cfg.to_json_string(use_diff=False) if cfg is not None else "").encode())
    with torch.no_grad():   # parameter fingerprint: cheap sums, enough to tell weights apart
        for name, p in named_weights(model):       # offloaded ones where they wait
            d = p.detach().double()
            h.update(f"{name}:{d.sum().item():.10e}:{d.abs().sum().item():.10e}".encode())
    h.update(decomposition.encode())
    for name in sorted(factors):
        h.update(name.encode())
        h.update(factors[name].S.detach().float().cpu().numpy().tobytes())
    h.update(windows.cpu().to(torch.int64).numpy().tobytes())
    h.update(json.dumps([float(c) for c in candidates]).encode())
    return h.hexdigest()[:24]


def _cache_dir(ctx_dir: str | None) -> Path:
    base = ctx_dir or os.environ.get("LLRC_CACHE_DIR") or Path.home() / ".cache" / "llrc_studio"
    return Path(base) / "strs"


# --------------------------------------------------------------------------- threshold search
def ranks_at_threshold(table, shapes, threshold: float) -> dict[str, int]:
    """Each layer: the smallest candidate whose score <= threshold, else dense (break-even)."""
    ranks = {}
    for name, row in table.items():
        m, n = shapes[name]
        ok = [float(r) for r, s in row.items() if s <= threshold]
        ranks[name] = candidate_rank(m, n, min(ok)) if ok else break_even(m, n)
    return ranks


def _interp_score(row: dict, base: float, frac: float) -> float:
    pts = sorted((float(r), s) for r, s in row.items()) + [(1.0, base)]
    for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
        if frac <= r1:
            w = 0.0 if frac <= r0 else (frac - r0) / (r1 - r0)
            return s0 + w * (s1 - s0)
    return base


def threshold_search(table, base, shapes, budget: int) -> tuple[dict[str, int], float]:
    scores = sorted({s for row in table.values() for s in row.values()})
    cost = lambda thr: ranks_cost(ranks_at_threshold(table, shapes, thr), shapes)  # noqa: E731
    if cost(scores[-1]) > budget:
        raise ValueError("STRS: even the smallest candidate ratio in every layer exceeds the "
                         "budget; add smaller candidates (e.g. candidates=[0.05,0.1,...]) or "
                         "choose a larger ratio")
    i = bisect.bisect_left(range(len(scores)), True, key=lambda j: cost(scores[j]) <= budget)
    thr = scores[i]
    ranks = ranks_at_threshold(table, shapes, thr)
    be = {n: break_even(*shapes[n]) for n in shapes}
    ranks = land_on_budget(ranks, shapes, budget,
                        lambda n, k: _interp_score(table[n], base, k / be[n]) - base)
    return ranks, thr


@register_selector("strs", STRSConfig, preferred="asvd", calibration=True)
def select_strs(ctx: SelectionContext, cfg: STRSConfig):
    if ctx.model is None or ctx.windows is None:
        raise ValueError("STRS needs the model and calibration windows (pass --calib)")
    if not ctx.factors:
        raise ValueError("STRS needs the decomposition's factors; run decompose_model first")
    budget = ctx.reachable_budget(cfg)
    windows = ctx.windows[:cfg.max_windows] if cfg.max_windows else ctx.windows
    key = cache_key(ctx.model, ctx.decomposition, ctx.factors, windows, cfg.candidates)
    path = _cache_dir(ctx.cache_dir) / f"{key}.json"
    t0 = time.time()
    if path.exists():
        data = json.loads(path.read_text())
        table, base, passes, hit = data["table"], data["base"], 0, True
    else:
        table, base, passes = sensitivity_table(ctx.model, ctx.factors, windows, cfg.candidates,
                                                cfg.batch_size, ctx.callback, ctx.should_stop)
        atomic_json(path, {"base": base, "table": table, "candidates": list(cfg.candidates)})
        hit = False
    missing = set(ctx.shapes) - set(table)
    if missing:
        raise ValueError(f"STRS: no sensitivity for {sorted(missing)[:3]}; were the factors "
                         "computed for every target layer?")
    table = {n: table[n] for n in ctx.shapes}
    ranks, thr = threshold_search(table, base, ctx.shapes, budget)
    return ctx.prefix_plan(ranks, "strs", cfg, threshold=thr, base_score=base,
                           sensitivity_passes=passes, cache_hit=hit, cache_key=key,
                           sensitivity_seconds=time.time() - t0)

