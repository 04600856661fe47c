"""What every selector shares: its config base, the context it reads, budget helpers.

A selector is ``select(ctx, cfg) -> RankPlan``; it never touches modules. It registers with
``@register_selector("name", ConfigClass, ...)`` (``registry.py``); entry points look it up
with ``get_selector``.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import gates
from ..config import ConfigMixin, option
from ..counting import break_even, check_ratio, check_scope, layer_cost, linear_budget, ratios
from ..plan import LayerPlan, RankPlan

SELECTIONS = ("top-k", "any-k")


@dataclass
class SelectConfig(ConfigMixin):
    """Fields every method takes; methods subclass it with their own hyperparameters.
    Plumbing (callbacks, checkpoints, caches) lives on the ``SelectionContext``, not here."""

    ratio: float = option(0.8, "target parameter ratio (kept / original), in (0, 1]")
    scope: str = option("linear", "linear (target layers) or model (whole model)")
    selection: str = option("top-k", "top-k (prefix) or any-k (any subset; learned methods)")

    def __post_init__(self):
        check_ratio(self.ratio)
        check_scope(self.scope)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")


@dataclass
class SelectionContext:
    """Everything a selector may read. Learned methods also use the model and windows."""
    shapes: dict[str, tuple[int, int]]        # target name -> (m, n)
    spectra: dict[str, torch.Tensor]          # target name -> singular values (descending)
    total_params: int                         # whole model before compression
    decomposition: str = "svd"
    factors: dict[str, Any] = field(default_factory=dict)   # name -> decompose.Factors
    model: Any = None
    windows: torch.Tensor | None = None       # calibration token windows (n, L)
    stats: dict[str, Any] = field(default_factory=dict)
    callback: Callable[[dict], None] | None = None    # progress events
    should_stop: Callable[[], bool] = lambda: False   # cooperative stop (app's Stop button)
    cache_dir: str | None = None                      # STRS's sensitivity tables
    checkpoint: str | None = None     # learned methods: state file; a run resumes from it
    checkpoint_every: int = 50        # learned methods: steps between checkpoints
    mask_every: int = 10              # learned methods: steps between "masks" events (0: never)
    placement: Any = None             # learned methods: a placement.Placement (None: all on
                                      # the model's device)

    def targets_device(self):
        """Where learned methods keep their distillation targets (None: the model's device)."""
        return None if self.placement is None or not self.placement.offload_targets \
            else torch.device("cpu")

    @property
    def dense_linear(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    def budget(self, ratio: float, scope: str) -> int:
        """Weight parameters the target layers may keep."""
        return linear_budget(ratio, scope, self.dense_linear, self.total_params)

    def min_ratio(self, scope: str) -> float:
        """The smallest reachable ratio in ``scope``: rank 1 in every target layer."""
        return ratios(sum(m + n for m, n in self.shapes.values()), self.dense_linear,
                      self.total_params)[scope]

    def reachable_budget(self, cfg: "SelectConfig") -> int:
        """``cfg``'s budget, refused (``ValueError`` naming the minimum) when rank 1 in every
        layer already exceeds it: every method checks the target the same way, and
        ``preflight`` does so from the layer shapes before any weight is read."""
        budget = self.budget(cfg.ratio, cfg.scope)
        if budget < sum(m + n for m, n in self.shapes.values()):
            least = math.ceil(self.min_ratio(cfg.scope) * 1e4) / 1e4
            raise ValueError(f"target ratio {cfg.ratio:g} ({cfg.scope} scope) is unreachable: "
                             f"rank 1 in every layer already keeps {least:.4f}; choose "
                             f"--ratio {least:.4f} or more")
        return budget

    def plan(self, kept: dict[str, list[int] | None], method: str, cfg: SelectConfig,
             **meta) -> RankPlan:
        layers = {n: LayerPlan(*self.shapes[n], kept[n]) for n in self.shapes}
        return RankPlan(layers, self.total_params, method, self.decomposition, cfg.selection,
                        {"config": cfg.to_dict(), **meta})

    def prefix_plan(self, ranks: dict[str, int], method: str, cfg: SelectConfig, **meta):
        return self.plan({n: list(range(max(1, int(k)))) for n, k in ranks.items()},
                         method, cfg, **meta)


def ranks_cost(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(layer_cost(*shapes[n], k) for n, k in ranks.items())


def land_on_budget(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], budget: int,
                   gain: Callable[[str, int], float],
                   loss: Callable[[str, int], float] | None = None) -> dict[str, int]:
    """Land a set of per-layer counts on ``budget``, one rank step at a time.

    With ``loss``: while over budget, remove the rank whose ``loss(name, k)`` (dropping the
    ``k``-th value of a layer keeping ``k``) is smallest, never below 1. Then, while the budget
    holds, add the rank with the largest ``gain(name, k)`` (the value at index ``k``) up to
    break-even; a step that would cross break-even costs the jump to dense (``m n``) and is
    taken only if it fits. Every method that ends on the budget lands here.
    """
    ranks = dict(ranks)
    spent = ranks_cost(ranks, shapes)

    def step_cost(n, k):                       # parameters of going from k to k + 1
        return layer_cost(*shapes[n], k + 1) - layer_cost(*shapes[n], k)

    if loss is not None and spent > budget:
        heap = [(loss(n, k), n) for n, k in ranks.items() if k > 1]
        heapq.heapify(heap)
        while spent > budget and heap:
            _, n = heapq.heappop(heap)
            k = ranks[n]
            ranks[n], spent = k - 1, spent - step_cost(n, k - 1)
            if k - 1 > 1:
                heapq.heappush(heap, (loss(n, k - 1), n))
    heap = [(-gain(n, k), n) for n, k in ranks.items() if k < break_even(*shapes[n])]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        k = ranks[n]
        if spent + step_cost(n, k) > budget:
            continue
        ranks[n], spent = k + 1, spent + step_cost(n, k)
        if k + 1 < break_even(*shapes[n]):
            heapq.heappush(heap, (-gain(n, k + 1), n))
    return ranks


def kept_on_budget(scores: dict[str, torch.Tensor], counts: dict[str, int],
                   shapes: dict[str, tuple[int, int]], budget: int,
                   selection: str) -> dict[str, list[int]]:
    """Land per-layer ``counts`` on ``budget`` in the order of ``scores`` (one score per
    singular value: a layer drops its lowest-scored kept value, adds its highest-scored
    one not kept), then keep each layer's best-scored values (any-k) or its prefix
    (top-k, ``gates.kept_by_score``). How LLRC's gates (scores: the logits) and a vote of
    plans (``vote.py``) end on the budget."""
    ranked = {n: s.sort(descending=True).values for n, s in scores.items()}
    counts = land_on_budget(
        counts, shapes, budget,
        gain=lambda n, k: float(ranked[n][k]) if k < len(ranked[n]) else -math.inf,
        loss=lambda n, k: float(ranked[n][k - 1]))
    return gates.kept_by_score(scores, counts, selection)


def majority_on_budget(count: dict[str, torch.Tensor], voters: int,
                       tie: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                       budget: int, selection: str) -> dict[str, list[int]]:
    """A vote landed on ``budget``: ``count[name]`` is how many of ``voters`` kept each
    singular value. Each layer starts from the values a majority kept, then lands by count,
    ties by ``tie`` (each ``|tie| < 1``, so it never outweighs one vote). The vote of seeds'
    plans (``vote.py``) and LLRC's vote of its held steps (``hold_vote``)."""
    scores = {n: c + tie[n] for n, c in count.items()}
    majority = {n: max(1, int((c > voters / 2).sum())) for n, c in count.items()}
    return kept_on_budget(scores, majority, shapes, budget, selection)


def bisect_monotone(cost: Callable[[float], int], budget: int, lo: float = 0.0,
                    hi: float = 1.0, iters: int = 50) -> float:
    """Largest ``x`` in [lo, hi] with ``cost(x) <= budget`` for a non-decreasing ``cost``."""
    if cost(hi) <= budget:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return lo

