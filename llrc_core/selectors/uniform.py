"""Uniform ranks: the same fraction of break-even in every layer
(``k = floor(rho m n / (m + n))`` in linear scope), then +1 steps to meet the budget."""
from __future__ import annotations

import math

from ..counting import break_even
from .base import SelectConfig, SelectionContext, bisect_monotone, land_on_budget, ranks_cost
from .registry import register_selector


def uniform_ranks(ctx: SelectionContext, budget: int) -> tuple[dict[str, int], float]:
    """The same fraction of break-even in every layer, landed on ``budget``; and the
    fraction."""
    be = {name: break_even(m, n) for name, (m, n) in ctx.shapes.items()}

    def ranks_at(f: float) -> dict[str, int]:
        return {n: max(1, min(be[n], math.floor(f * be[n]))) for n in ctx.shapes}

    f = bisect_monotone(lambda f: ranks_cost(ranks_at(f), ctx.shapes), budget)
    # Top up the layers furthest below the common fraction first.
    return land_on_budget(ranks_at(f), ctx.shapes, budget, lambda n, k: -k / be[n]), f


@register_selector("uniform")
def select_uniform(ctx: SelectionContext, cfg: SelectConfig):
    ranks, f = uniform_ranks(ctx, ctx.reachable_budget(cfg))
    return ctx.prefix_plan(ranks, "uniform", cfg, fraction=f)
