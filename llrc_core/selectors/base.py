"""What every selector shares: the registry, the context it reads, budget helpers.

A selector is ``select(ctx, cfg) -> RankPlan``; it never touches modules. It registers with
``@register_selector("name", ConfigClass)``; entry points look it up with ``get_selector``.
"""
from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..counting import break_even, check_ratio, check_scope, layer_cost, linear_budget
from ..plan import LayerPlan, RankPlan

SELECTIONS = ("top-k", "any-k")


@dataclass
class SelectConfig:
    """Fields every method takes; methods subclass it with their own hyperparameters."""
    # Selections a grid or the app offers for this method (learned any-k methods add "any-k").
    supported_selections: ClassVar[tuple[str, ...]] = ("top-k",)

    ratio: float = 0.8          # target parameter ratio (kept / original), in (0, 1]
    scope: str = "linear"       # "linear" (target layers) or "model" (whole model)
    selection: str = "top-k"    # "top-k" (prefix) or "any-k" (any subset; learned methods)

    def __post_init__(self):
        check_ratio(self.ratio)
        check_scope(self.scope)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SelectConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; "
                             f"known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


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
    cache_dir: str | None = None

    @property
    def dense_linear(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    def budget(self, ratio: float, scope: str) -> int:
        """Weight parameters the target layers may keep."""
        return linear_budget(ratio, scope, self.dense_linear, self.total_params)

    def plan(self, kept: dict[str, list[int] | None], method: str, cfg: SelectConfig,
             **meta) -> RankPlan:
        layers = {n: LayerPlan(*self.shapes[n], kept[n]) for n in self.shapes}
        return RankPlan(layers, self.total_params, method, self.decomposition, cfg.selection,
                        {"config": cfg.to_dict(), **meta})

    def prefix_plan(self, ranks: dict[str, int], method: str, cfg: SelectConfig, **meta):
        return self.plan({n: list(range(max(1, int(k)))) for n, k in ranks.items()},
                         method, cfg, **meta)


SELECTORS: dict[str, tuple[type, Callable]] = {}


def register_selector(name: str, config_cls: type = SelectConfig):
    def deco(fn):
        SELECTORS[name] = (config_cls, fn)
        return fn
    return deco


def get_selector(name: str) -> tuple[type, Callable]:
    if name not in SELECTORS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SELECTORS)}")
    return SELECTORS[name]


def ranks_cost(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(layer_cost(*shapes[n], k) for n, k in ranks.items())


def fill_budget(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], budget: int,
                gain: Callable[[str, int], float]) -> dict[str, int]:
    """Greedy +1 rank steps, best ``gain(name, next_index)`` first, while the budget holds.

    Used to land on the target within one rank step after a coarse search. A step that would
    cross break-even costs the jump to dense (``m n``) and is taken only if it fits.
    """
    ranks = dict(ranks)
    spent = ranks_cost(ranks, shapes)
    heap = [(-gain(n, k), n) for n, k in ranks.items() if k < break_even(*shapes[n])]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        k = ranks[n]
        step = layer_cost(*shapes[n], k + 1) - layer_cost(*shapes[n], k)
        if spent + step > budget:
            continue
        ranks[n], spent = k + 1, spent + step
        if k + 1 < break_even(*shapes[n]):
            heapq.heappush(heap, (-gain(n, k + 1), n))
    return ranks


def bisect_monotone(cost: Callable[[float], int], budget: int, lo: float = 0.0,
                    hi: float = 1.0, iters: int = 50) -> float:
    """Largest ``x`` in [lo, hi] with ``cost(x) <= budget`` for a non-decreasing ``cost``."""
    if cost(hi) <= budget:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return lo


def check_reachable(ctx: SelectionContext, budget: int) -> None:
    floor = sum(m + n for m, n in ctx.shapes.values())   # rank 1 everywhere
    if budget < floor:
        raise ValueError(f"the target ratio is below what rank 1 in every layer keeps "
                         f"({floor / ctx.dense_linear:.4f} of the target layers); choose a "
                         "larger ratio")
