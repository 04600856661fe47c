"""ARA — adaptive rank allocation (arXiv 2510.19389).

Meant for the whitened decomposition (SVD-LLM); any decomposition's factors work, and the
plan records which one was used. Per target layer:

* ``K = floor(k_factor m n / (m + n))`` kept candidates (``k_factor`` 1.2: above break-even,
  so a layer can reach "dense"), capped at the number of singular values the factors have;
* a softmax ``p`` over ``D + 1`` candidate fractions ``c_j = 1 - j / D``; expected fraction
  ``rho = sum_j c_j p_j``;
* monotone soft mask ``soft_i = P(fraction > i / K) = sum_j p_j [i < K c_j]`` (a staircase
  matrix times ``p``: non-increasing in ``i``); hard prefix mask of length ``round(K rho)``;
  the forward pass uses ``hard - sg(soft) + soft``;
* dense switch: when ``k_factor rho >= 1`` (or the prefix reaches break-even) the layer runs
  with every singular value (exactly ``W``); the soft mask's gradient still flows.

Loss = objective + alpha (R - R*)^2 + beta * guidance, where ``R`` is the parameter ratio in
``cfg.scope`` (dense layers cost ``m n``, others ``k (m + n)``; straight-through to the soft
cost ``K rho (m + n)`` so a dense layer can still be pulled back). Guidance (the paper gives
no formula we could check; this is our reading): a compressed layer whose relative truncation
error ``sqrt(sum dropped S^2 / sum S^2)`` exceeds its parameter saving ``1 - k (m + n) / (m n)``
is pushed towards dense by ``relu(1 / k_factor - rho)``; the mean over layers is the term.

Initialisation (the paper is silent): every layer starts at the fraction ``t`` that meets the
target with uniform ranks, so training starts at the budget and reallocates. ``two-level``
(the default, as the authors' code does): one logit for every candidate at or above ``t``,
zero below, the gap chosen so that the expected fraction is ``t``; the softmax is broad, so
the expected fraction moves fast. ``bump`` (our first reading): a Gaussian bump of width
``init_width`` at ``t`` (flat logits when the width is 0); narrow, so it moves slowly.

Finalise: scale every expected fraction by one factor ``s`` (bisection) so the budget holds,
dense switch re-applied, then +1 steps to the largest rounding deficits (``land_on_budget``).
The loop, events and checkpoints are the shared ones (``learned.train_masks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..counting import break_even
from .base import (SelectionContext, bisect_monotone, land_on_budget,
                   ranks_cost)
from ..config import option
from .learned import MaskTrainer, TrainConfig, check_fields, other_params, register_learned
from .objective import EpochBatches

INITS = ("two-level", "bump")


@dataclass
class ARAConfig(TrainConfig):
    lr: float = option(1e-3, "AdamW learning rate")
    candidates: int = field(default=100, metadata={
        "help": "D: candidate fractions c_j = 1 - j/D, j = 0..D"})
    k_factor: float = field(default=1.2, metadata={
        "help": "K = floor(k_factor m n/(m+n)); a layer is dense when k_factor * rho >= 1"})
    alpha: float = field(default=100.0, metadata={"help": "weight of (R - R*)^2"})
    beta: float = field(default=50.0, metadata={"help": "weight of the guidance loss"})
    init: str = option("two-level", "'two-level' (authors' code: broad, two logit levels "
                       "around the uniform fraction) or 'bump' (a bump of init_width)")
    init_width: float = field(default=0.1, metadata={
        "help": "init 'bump': its width around the uniform fraction (0: flat)"})

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, positive=("candidates",),
                     nonneg=("alpha", "beta", "init_width"))
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.k_factor < 1:
            raise ValueError(f"k_factor must be >= 1 (K must reach break-even), got "
                             f"{self.k_factor}")


# --- pure maths (rows are layers, zero-padded to the longest) -----------------------------
def candidate_fractions(D: int) -> torch.Tensor:
    return 1 - torch.arange(D + 1, dtype=torch.float32) / D            # (D+1,) 1 .. 0


def staircase_index(K: int, c: torch.Tensor, width: int) -> torch.Tensor:
    """``J[i] = #{j : i < K c_j}`` for ``i < K`` (0 beyond): the staircase matrix
    ``M[i, j] = [i < K c_j]`` in compact form. ``c`` is descending, so row ``i`` of ``M`` is
    the prefix ``j < J[i]``; rows are nested, so ``M p`` is non-increasing in ``i``."""
    i = torch.arange(width, dtype=c.dtype)
    J = (i[:, None] < K * c[None, :]).sum(1)                            # (width,)
    return J.masked_fill(i >= K, 0)


def soft_masks(logits: torch.Tensor, c: torch.Tensor, J: torch.Tensor):
    """``(soft (L, K_max), rho (L,))``: ``soft_i = P(fraction > i / K) = (M p)_i`` read off
    the cumulative softmax; ``rho`` the expected fraction."""
    p = torch.softmax(logits, -1)                                        # (L, D+1)
    cdf0 = F.pad(p.cumsum(-1), (1, 0))                                   # (L, D+2): P(j < J)
    return cdf0.gather(1, J), p @ c


def st_masks(soft: torch.Tensor, rho: torch.Tensor, K: torch.Tensor, r: torch.Tensor,
             be: torch.Tensor, k_factor: float, r_max: int):
    """Straight-through masks ``(L, r_max)`` over every singular value, with ``k`` and
    ``dense`` (L,): the value is a prefix of ``round(K rho)`` (all ``r`` when dense), the
    gradient that of the soft mask."""
    k = (K * rho.detach()).round().clamp_min(1).long()                  # (L,)
    dense = (k_factor * rho.detach() >= 1) | (k >= be)                  # (L,)
    idx = torch.arange(r_max, device=soft.device)
    value = torch.where(dense[:, None], idx < r[:, None], idx < k[:, None]).to(soft.dtype)
    grad = F.pad(soft - soft.detach(), (0, r_max - soft.shape[1]))     # zero in value
    return value + grad, k, dense


def tail_error(S: torch.Tensor) -> torch.Tensor:
    """``e[k] = sqrt(sum_{i >= k} S_i^2 / sum S^2)`` for k = 0..r: (r+1,)."""
    e2 = (S.double() ** 2).flip(0).cumsum(0).flip(0)
    e2 = torch.cat([e2, e2.new_zeros(1)])
    return (e2 / e2[0].clamp_min(1e-300)).sqrt().float()


def init_logits(c: torch.Tensor, centres: torch.Tensor, init: str = "two-level",
                width: float = 0.1) -> torch.Tensor:
    """(L, D+1) logits whose softmax has the expected fraction ``centres`` (L,).

    ``two-level``: ``g`` on the candidates ``c_j >= t``, 0 below; with ``n1, S1`` (``n2,
    S2``) the count and sum of the candidates above (below), ``E[c] = t`` solves to
    ``exp(g) = (S2 - t n2) / (t n1 - S1)``. ``t`` is kept half a step inside (0, 1), where
    the gap is finite. ``bump``: a Gaussian of ``width`` at ``t`` (flat when ``width`` is 0).
    """
    if init == "bump":
        if width == 0:
            return torch.zeros(centres.numel(), c.numel())
        return -0.5 * ((c[None, :] - centres[:, None]) / width) ** 2
    c, half = c.double(), 0.5 / (c.numel() - 1)
    t = centres.double().clamp(half, 1 - half)[:, None]                  # (L, 1)
    above = c[None, :] >= t                                               # (L, D+1)
    n1, s1 = above.sum(1, keepdim=True), (c * above).sum(1, keepdim=True)
    n2, s2 = c.numel() - n1, c.sum() - s1
    gap = torch.log((s2 - t * n2) / (t * n1 - s1))
    return torch.where(above, gap, torch.zeros_like(gap)).float()


def rescale_counts(rho: dict[str, float], K: dict[str, int], shapes: dict[str, tuple[int, int]],
                   budget: int, k_factor: float) -> tuple[dict[str, int], float]:
    """Scale every fraction by one ``s`` to meet ``budget``; +1 steps to the largest deficit."""
    be = {n: break_even(*shapes[n]) for n in shapes}

    def counts_at(s: float) -> dict[str, int]:
        return {n: be[n] if k_factor * s * rho[n] >= 1
                else min(K[n], max(1, round(K[n] * s * rho[n]))) for n in shapes}

    hi = 1.0 / (k_factor * max(min(rho.values()), 1e-6)) + 1.0
    s = bisect_monotone(lambda s: ranks_cost(counts_at(s), shapes), budget, 0.0, hi)
    counts = land_on_budget(counts_at(s), shapes, budget,
                            lambda n, k: K[n] * s * rho[n] - k if k < K[n] else -1e30)
    return counts, s


# --- the trainer ------------------------------------------------------------------------
class ARATrainer(MaskTrainer):
    """A softmax over candidate fractions per layer; staircase masks, ratio and guidance."""

    def __init__(self, ctx: SelectionContext, cfg: ARAConfig, budget: int):
        super().__init__(ctx, cfg, budget)
        names, shapes, factors, device = self.names, ctx.shapes, ctx.factors, self.device
        self.ranks = [factors[n].rank for n in names]
        self.r_max = max(self.ranks)
        be = {n: break_even(*shapes[n]) for n in names}
        self.K = {n: min(factors[n].rank, int(cfg.k_factor * shapes[n][0] * shapes[n][1]
                                              / sum(shapes[n]))) for n in names}
        c = candidate_fractions(cfg.candidates)
        J = torch.stack([staircase_index(self.K[n], c, max(self.K.values()))
                         for n in names])                                    # (L, K_max)
        tails = torch.zeros(len(names), self.r_max + 1)                     # (L, r_max+1)
        for i, n in enumerate(names):
            tails[i, :self.ranks[i] + 1] = tail_error(factors[n].S)
        uniform = budget / ctx.dense_linear          # fraction of break-even, uniform ranks
        centres = torch.tensor([min(1.0, uniform * be[n] / self.K[n]) for n in names])
        self.logits = init_logits(c, centres, cfg.init, cfg.init_width
                                  ).to(device).requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.logits], lr=cfg.lr)
        per_layer = {"K": [self.K[n] for n in names], "r": self.ranks,
                     "be": [be[n] for n in names], "width": [sum(shapes[n]) for n in names],
                     "dense": [shapes[n][0] * shapes[n][1] for n in names]}
        self.t = {key: torch.tensor(v, device=device) for key, v in per_layer.items()}  # (L,)
        self.c, self.J, self.tails = c.to(device), J.to(device), tails.to(device)
        self.denom = ctx.dense_linear if cfg.scope == "linear" else ctx.total_params
        self.offset = 0 if cfg.scope == "linear" else other_params(ctx)
        self.batches = EpochBatches(ctx.windows.shape[0], cfg.batch_size, cfg.seed)

    def loss(self, layers, step: int):
        cfg, t = self.cfg, self.t
        soft, rho = soft_masks(self.logits, self.c, self.J)                 # (L, K_max), (L,)
        mask, k, dense = st_masks(soft, rho, t["K"], t["r"], t["be"], cfg.k_factor, self.r_max)
        for i, n in enumerate(self.names):
            layers[n].mask = mask[i, :self.ranks[i]]
        self.soft = soft.detach()
        self.counts = dict(zip(self.names, torch.where(dense, t["be"], k).tolist()))
        # Ratio: hard cost in the value, the soft cost K rho (m + n) in the gradient.
        soft_cost = t["K"] * rho * t["width"]
        hard_cost = torch.where(dense, t["dense"], k * t["width"]).to(rho.dtype)
        ratio = (self.offset + (hard_cost + soft_cost - soft_cost.detach()).sum()) / self.denom
        ratio_loss = (ratio - cfg.ratio) ** 2
        # Guidance: compressed layers whose truncation error exceeds their saving.
        error = self.tails.gather(1, k[:, None]).squeeze(1)                 # (L,)
        saving = 1 - k * t["width"] / t["dense"]
        flag = (~dense & (error > saving)).to(rho.dtype)
        guide = (flag * F.relu(1 / cfg.k_factor - rho)).mean()
        task = self.objective(next(self.batches))
        self.dense_layers = int(dense.sum())
        loss = task + cfg.alpha * ratio_loss + cfg.beta * guide
        return loss, {"loss_task": task.item(), "loss_ratio": ratio_loss.item(),
                      "loss_guide": guide.item()}

    def update(self):
        return self.counts, {"dense_layers": self.dense_layers}

    def mask_probs(self):
        sm = self.soft.cpu()
        return {n: sm[i, :self.K[n]].tolist() for i, n in enumerate(self.names)}

    def finalise(self):
        with torch.no_grad():
            rho = dict(zip(self.names, soft_masks(self.logits, self.c, self.J)[1].cpu().tolist()))
        counts, scale = rescale_counts(rho, self.K, self.ctx.shapes, self.budget,
                                       self.cfg.k_factor)
        return ({n: list(range(max(1, k))) for n, k in counts.items()},
                {"scale": scale, "fractions": rho})

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().cpu(), "drawn": self.batches.drawn}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.batches.skip_to(state["drawn"])


# The staircase mask keeps a prefix by construction: top-k only.
select_ara = register_learned("ara", ARAConfig, ARATrainer, preferred="whiten")
