"""D-Rank (arXiv 2509.25622): effective-rank allocation with a Lagrange solution per matrix type.

* Effective rank of each layer, ``R = exp(-sum p_i log p_i)`` with ``p_i = S_i^2 / sum S_j^2``,
  on the decomposition's singular values (whitened in the paper: use ``whiten``).
* Each matrix type (``Target.kind``: q, k, v, o, gate, up, down, ...) gets the share of the
  budget it has of the dense weights, ``T_g = budget * dense_g / dense_linear``. Within a
  type, minimising ``sum R_l / k_l`` subject to ``sum k_l w_l = T_g`` (``w = m + n``, the
  cost of one rank) gives ``k_l = T_g sqrt(R_l / w_l) / sum_j sqrt(R_j w_j)``; ranks are
  rounded and clipped to ``[1, break-even)``.
* Attention rebalance: in every block a fraction ``beta`` of the Q and K ranks moves to V,
  in parameter units (``floor(freed / w_v)`` ranks), so it also holds with grouped-query
  attention where K/V are narrower than Q. Blocks without separate q/k/v layers (GPT-2's
  fused ``c_attn``) are left alone. Default ``beta = 0.3`` (paper: 0.3-0.4 best; its code
  uses 0.2).
* The reference code differs in two ways, each an option measured in ``bench/README.md``
  (demo model, whitened, rho 0.9 / 0.8 / 0.6: ``fallback`` 94.65 / 96.24 / 98.77 against the
  paper's allocation 95.12 / 97.24 / 100.68, so it is the default; the even pool and
  beta 0.2 changed nothing beyond 0.2 ppl, so the paper's per-block move and 0.3 stay):
  ``fallback`` keeps the effective-rank allocation of a matrix type only where its
  truncation error (the sum of the dropped ``S_i^2``: the calibration output error on
  whitened factors) is below that of uniform ranks on the same type budget; ``pool="even"``
  gathers the Q and K share of every block into one pool spread evenly over all V layers.
* Greedy fix-up to the exact budget, one rank at a time by the same objective
  (``land_on_budget``): remove the rank whose loss ``R / (k (k - 1))`` per parameter is
  smallest while over budget, then add the rank with the largest gain ``R / (k (k + 1))``
  per parameter while it fits.
Cross-layer basis sharing (group size > 1) is not implemented (n = 1, as for GQA models).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..analysis import effective_rank
from ..counting import break_even
from .base import SelectConfig, SelectionContext, land_on_budget
from .registry import register_selector

_ROLE = {"q": re.compile(r"(^|\.)(q_proj|query|q|wq|q_lin)$"),
         "k": re.compile(r"(^|\.)(k_proj|key|k|wk|k_lin)$"),
         "v": re.compile(r"(^|\.)(v_proj|value|v|wv|v_lin)$")}


POOLS = ("block", "even")


@dataclass
class DRankConfig(SelectConfig):
    beta: float = field(default=0.3, metadata={
        "help": "fraction of Q and K rank moved to V (parameter units); 0 turns it off"})
    fallback: bool = field(default=True, metadata={
        "help": "per matrix type, keep the effective-rank allocation only where its "
        "truncation error (sum of the dropped S^2) is below uniform ranks' (the reference "
        "code; measured better on the demo model); off: always (the paper)"})
    pool: str = field(default="block", metadata={
        "help": "block: each block's Q and K share moves to its own V (the paper); even: one "
        "pool from every Q and K spread evenly over all V layers (the reference code)"})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}; the paper uses 0.3")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")


def lagrange_ranks(reff: dict[str, float], w: dict[str, int], T: float) -> dict[str, float]:
    """Real-valued minimiser of ``sum R/k`` subject to ``sum k w = T``."""
    denom = sum(math.sqrt(reff[n] * w[n]) for n in reff)
    return {n: T * math.sqrt(reff[n] / w[n]) / denom for n in reff}


def _role(kind: str) -> str | None:
    return next((r for r, pat in _ROLE.items() if pat.search(kind)), None)


def rebalance_qk_to_v(ranks: dict[str, int], roles: dict[str, tuple[int, str]],
                      shapes: dict[str, tuple[int, int]], beta: float, pool: str = "block"
                      ) -> dict[str, int]:
    """Move ``beta`` of the Q and K ranks to V, counted in parameters: within each block
    (``pool="block"``), or gathered from every block and spread evenly over every V
    (``"even"``). Parameters V cannot take (break-even) stay with the landing pass."""
    ranks = dict(ranks)
    blocks: dict[int, dict[str, str]] = {}
    for name, (block, role) in roles.items():
        blocks.setdefault(block, {})[role] = name
    trios = [(ls["q"], ls["k"], ls["v"]) for ls in blocks.values() if set(ls) == {"q", "k", "v"}]
    freed = {}
    for q, k, v in trios:
        dq, dk = math.floor(beta * ranks[q]), math.floor(beta * ranks[k])
        dq, dk = min(dq, ranks[q] - 1), min(dk, ranks[k] - 1)
        ranks[q], ranks[k] = ranks[q] - dq, ranks[k] - dk
        freed[v] = dq * sum(shapes[q]) + dk * sum(shapes[k])
    if pool == "even" and freed:
        share = sum(freed.values()) / len(freed)
        freed = dict.fromkeys(freed, share)
    for v, params in freed.items():
        room = break_even(*shapes[v]) - 1 - ranks[v]
        ranks[v] += min(int(params // sum(shapes[v])), max(room, 0))
    return ranks


def truncation_error(spectrum, k: int) -> float:
    """Sum of the dropped ``S_i^2`` when keeping the first ``k``: the output error on the
    calibration tokens for whitened factors."""
    return float(spectrum[k:].double().pow(2).sum())


@register_selector("drank", DRankConfig, preferred="whiten")
def select_drank(ctx: SelectionContext, cfg: DRankConfig):
    budget = ctx.reachable_budget(cfg)
    kinds = _kinds(ctx)
    reff = {n: effective_rank(s) for n, s in ctx.spectra.items()}
    w = {n: m + k for n, (m, k) in ctx.shapes.items()}
    groups: dict[str, list[str]] = {}
    for n in ctx.shapes:
        groups.setdefault(kinds[n][1], []).append(n)
    ranks, uniform_types = {}, []
    for kind, names in groups.items():
        dense = sum(ctx.shapes[n][0] * ctx.shapes[n][1] for n in names)
        T = budget * dense / ctx.dense_linear
        ideal = lagrange_ranks({n: reff[n] for n in names}, {n: w[n] for n in names}, T)
        dynamic = {n: int(min(max(round(ideal[n]), 1), break_even(*ctx.shapes[n]) - 1))
                   for n in names}
        if cfg.fallback:       # the same type budget as uniform ranks (one ratio per layer)
            rho = T / dense
            flat = {n: int(min(max(rho * ctx.shapes[n][0] * ctx.shapes[n][1] // w[n], 1),
                               break_even(*ctx.shapes[n]) - 1)) for n in names}
            err = {key: sum(truncation_error(ctx.spectra[n], r[n]) for n in names)
                   for key, r in (("dynamic", dynamic), ("uniform", flat))}
            if err["uniform"] <= err["dynamic"]:
                dynamic = flat
                uniform_types.append(kind)
        ranks.update(dynamic)
    roles = {n: (b, r) for n, (b, kind) in kinds.items() if (r := _role(kind)) is not None}
    if cfg.beta > 0:
        ranks = rebalance_qk_to_v(ranks, roles, ctx.shapes, cfg.beta, cfg.pool)
    # Objective change per parameter of one rank step: R/(k(k+1)) gained, R/(k(k-1)) lost.
    ranks = land_on_budget(ranks, ctx.shapes, budget,
                           lambda n, k: reff[n] / (max(k, 1) * (k + 1)) / w[n],
                           lambda n, k: reff[n] / (k * (k - 1)) / w[n])
    return ctx.prefix_plan(ranks, "drank", cfg, effective_rank=reff,
                           groups={g: len(v) for g, v in groups.items()},
                           uniform_types=uniform_types)


def _kinds(ctx: SelectionContext) -> dict[str, tuple[int, str]]:
    """``name -> (block, kind)``: from the model's targets, else parsed from the names
    (``...layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``)."""
    if ctx.model is not None:
        from ..models import find_targets
        found = {t.name: (t.block, t.kind) for t in find_targets(ctx.model)}
        if set(ctx.shapes) <= set(found):
            return {n: found[n] for n in ctx.shapes}
    out = {}
    for n in ctx.shapes:
        mt = re.search(r"\.(\d+)\.(.+)$", n)
        out[n] = (int(mt.group(1)), re.sub(r"\.\d+\.", ".", mt.group(2))) if mt else (0, n)
    return out

