"""A vote of several rank plans of one model: the singular values most of them keep.

Seeds of a learned method (LLRC, ARS, ARA) land on the same budget with plans that differ in
which values they keep. The vote scores every value by how many plans keep it (a dense layer
keeps all of its values), breaking ties by the lower index, starts each layer from the values
a majority keeps and lands that on the budget with the shared ``land_on_budget`` (the mean
of the plans' weights, so it is met as well as theirs is). Any-k plans vote for any subset;
top-k plans vote for prefixes and get a prefix back (their votes never rise with the index).

Measured (``bench/README.md``, "A vote of three seeds"): on the demo model, LLRC any-k on
whitened factors, each vote of three seeds was below its seeds' mean perplexity at rho 0.9
and 0.6 (three triples at 0.6, as selected and refitted, on 16 windows and on the whole test
set), by less than 2 sd of the single seeds unpaired, and level with them at 0.8. On MiniLM
(top-k on ASVD factors) the vote was worse than its seeds' mean, for LLRC and ARS alike:
prefixes voted layer by layer lose how each seed spread the budget over the blocks. So it is
an option, not a default.
"""
from __future__ import annotations

import torch

from .plan import LayerPlan, RankPlan
from .selectors.base import majority_on_budget


def votes(plans: list[RankPlan], name: str) -> torch.Tensor:
    """How many of ``plans`` keep each singular value of layer ``name``  # (min(m, n),)"""
    lp = plans[0].layers[name]
    out = torch.zeros(min(lp.m, lp.n))
    for p in plans:
        kept = p.layers[name].kept
        if kept is None:
            out += 1
        else:
            out[kept] += 1
    return out


def _check(plans: list[RankPlan]) -> None:
    if not plans:
        raise ValueError("a vote needs at least one plan")
    first = plans[0]
    shapes = {n: (lp.m, lp.n) for n, lp in first.layers.items()}
    for p in plans[1:]:
        if {n: (lp.m, lp.n) for n, lp in p.layers.items()} != shapes:
            raise ValueError("plans of different models (or target layers) cannot vote: "
                             "pass plans of one model's compression")
        if (p.decomposition, p.selection) != (first.decomposition, first.selection):
            raise ValueError(
                f"plans on different factors cannot vote ({first.decomposition} "
                f"{first.selection} against {p.decomposition} {p.selection}): a singular value's "
                "index means a different direction; vote plans of one decomposition and selection")


def vote_plans(plans: list[RankPlan], method: str | None = None) -> RankPlan:
    """The plan most of ``plans`` agree on, landed on their mean weight count."""
    _check(plans)
    first = plans[0]
    shapes = {n: (lp.m, lp.n) for n, lp in first.layers.items()}
    budget = sum(p.kept_linear for p in plans) // len(plans)
    count = {n: votes(plans, n) for n in shapes}
    tie = {n: -torch.arange(len(v)) / len(v) for n, v in count.items()}    # the lower index
    kept = majority_on_budget(count, len(plans), tie, shapes, budget, first.selection)
    layers = {n: LayerPlan(m, k_in, kept[n]) for n, (m, k_in) in shapes.items()}
    return RankPlan(layers, first.total_params, method or f"{first.method} vote",
                    first.decomposition, first.selection,
                    {**{k: v for k, v in first.meta.items() if k != "polish"},
                     "vote_of": len(plans)})   # a vote of polished plans is not polished
                                               # itself: their polish figures are not its
