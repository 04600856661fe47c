"""Energy threshold: each layer keeps the smallest prefix whose cumulative ``S_i^2`` reaches
``tau``; ``tau`` is searched to meet the budget, then +1 steps go to the largest next
singular-value energy share."""
from __future__ import annotations

import torch

from ..analysis import cumulative_energy, energy_share
from .base import SelectConfig, SelectionContext, bisect_monotone, land_on_budget, ranks_cost
from .registry import register_selector


@register_selector("energy")
def select_energy(ctx: SelectionContext, cfg: SelectConfig):
    budget = ctx.reachable_budget(cfg)
    share = {n: energy_share(s) for n, s in ctx.spectra.items()}
    cum = {n: cumulative_energy(s) for n, s in ctx.spectra.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: max(1, int(torch.searchsorted(c, torch.tensor(tau, dtype=c.dtype)).item()) + 1)
                for n, c in cum.items()}

    tau = bisect_monotone(lambda t: ranks_cost(ranks_at(t), ctx.shapes), budget, hi=1.0 - 1e-12)
    ranks = land_on_budget(ranks_at(tau), ctx.shapes, budget,
                        lambda n, k: share[n][k].item() if k < len(share[n]) else 0.0)
    return ctx.prefix_plan(ranks, "energy", cfg, tau=tau)
