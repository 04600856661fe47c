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

Initialisation (our choice, the paper is silent): every layer's softmax is a Gaussian bump of
width ``init_width`` at the fraction that meets the target with uniform ranks, so training
starts at the budget and reallocates; ``init_width = 0`` gives uniform logits.

Finalise: scale every expected fraction by one factor ``s`` (bisection) so the budget holds,
dense switch re-applied, then +1 steps to the largest rounding deficits (``fill_budget``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..counting import break_even
from .base import (SelectConfig, SelectionContext, bisect_monotone, check_reachable,
                   fill_budget, ranks_cost, register_selector)
from .learned import (Clock, Objective, achieved, batch_indices, check_context, check_fields,
                      emit, masked_session, one_thread, other_params)


@dataclass
class ARAConfig(SelectConfig):
    steps: int = field(default=300, metadata={"help": "training steps of the candidate logits"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per step"})
    candidates: int = field(default=100, metadata={
        "help": "D: candidate fractions c_j = 1 - j/D, j = 0..D"})
    k_factor: float = field(default=1.2, metadata={
        "help": "K = floor(k_factor m n/(m+n)); a layer is dense when k_factor * rho >= 1"})
    alpha: float = field(default=100.0, metadata={"help": "weight of (R - R*)^2"})
    beta: float = field(default=50.0, metadata={"help": "weight of the guidance loss"})
    init_width: float = field(default=0.1, metadata={
        "help": "softmax starts as a bump of this width at the uniform fraction (0: flat)"})
    objective: str = field(default="auto", metadata={
        "help": "'lm' (next-token CE), 'distill' (last hidden-state MSE) or 'auto' "
                "(lm when the model has an LM head)"})
    seed: int = field(default=0, metadata={"help": "batch order"})
    mask_every: int = field(default=50, metadata={
        "help": "emit a 'masks' event every this many steps (0: never)"})

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, positive=("steps", "lr", "batch_size", "candidates"),
                     nonneg=("alpha", "beta", "init_width", "mask_every"))
        if self.selection != "top-k":
            raise ValueError("ARA's staircase mask keeps a prefix by construction: use "
                             "selection='top-k'")
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


def init_logits(c: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """(L, D+1): a Gaussian bump at each layer's centre fraction (flat when width is 0)."""
    if width == 0:
        return torch.zeros(centres.numel(), c.numel())
    return -0.5 * ((c[None, :] - centres[:, None]) / width) ** 2


def rescale_counts(rho: dict[str, float], K: dict[str, int], shapes: dict[str, tuple[int, int]],
                   budget: int, k_factor: float) -> tuple[dict[str, int], float]:
    """Scale every fraction by one ``s`` to meet ``budget``; +1 steps to the largest deficit."""
    be = {n: break_even(*shapes[n]) for n in shapes}

    def counts_at(s: float) -> dict[str, int]:
        return {n: be[n] if k_factor * s * rho[n] >= 1
                else min(K[n], max(1, round(K[n] * s * rho[n]))) for n in shapes}

    hi = 1.0 / (k_factor * max(min(rho.values()), 1e-6)) + 1.0
    s = bisect_monotone(lambda s: ranks_cost(counts_at(s), shapes), budget, 0.0, hi)
    counts = fill_budget(counts_at(s), shapes, budget,
                         lambda n, k: K[n] * s * rho[n] - k if k < K[n] else -1e30)
    return counts, s


# --- orchestration ------------------------------------------------------------------------
@register_selector("ara", ARAConfig)
def select_ara(ctx: SelectionContext, cfg: ARAConfig):
    check_context(ctx, "ARA")
    budget = ctx.budget(cfg.ratio, cfg.scope)
    check_reachable(ctx, budget)
    names = list(ctx.shapes)
    objective = Objective(ctx.model, ctx.windows, cfg.objective, cfg.batch_size)
    device = objective.device
    shapes, factors = ctx.shapes, ctx.factors
    ranks = [factors[n].rank for n in names]
    r_max = max(ranks)
    be = {n: break_even(*shapes[n]) for n in names}
    K = {n: min(factors[n].rank, int(cfg.k_factor * shapes[n][0] * shapes[n][1]
                                     / sum(shapes[n]))) for n in names}
    c = candidate_fractions(cfg.candidates)
    J = torch.stack([staircase_index(K[n], c, max(K.values())) for n in names])  # (L, K_max)
    tails = torch.zeros(len(names), r_max + 1)                          # (L, r_max+1)
    for i, n in enumerate(names):
        tails[i, :ranks[i] + 1] = tail_error(factors[n].S)
    uniform = budget / ctx.dense_linear              # fraction of break-even, uniform ranks
    centres = torch.tensor([min(1.0, uniform * be[n] / K[n]) for n in names])
    logits = init_logits(c, centres, cfg.init_width).to(device).requires_grad_(True)
    opt = torch.optim.AdamW([logits], lr=cfg.lr)
    per_layer = {"K": [K[n] for n in names], "r": ranks, "be": [be[n] for n in names],
                 "width": [sum(shapes[n]) for n in names],
                 "dense": [shapes[n][0] * shapes[n][1] for n in names]}
    t = {key: torch.tensor(v, device=device) for key, v in per_layer.items()}   # (L,) each
    c, J, tails = c.to(device), J.to(device), tails.to(device)
    denom = ctx.dense_linear if cfg.scope == "linear" else ctx.total_params
    offset = 0 if cfg.scope == "linear" else other_params(ctx)
    clock, stopped, step = Clock(), False, 0

    with masked_session(ctx.model, {n: factors[n] for n in names}) as layers:
        batches = batch_indices(ctx.windows.shape[0], cfg.batch_size, cfg.seed)
        for step in range(1, cfg.steps + 1):
            if ctx.should_stop():
                stopped, step = True, step - 1
                break
            soft, rho = soft_masks(logits, c, J)                        # (L, K_max), (L,)
            mask, k, dense = st_masks(soft, rho, t["K"], t["r"], t["be"], cfg.k_factor, r_max)
            for i, n in enumerate(names):
                layers[n].mask = mask[i, :ranks[i]]
            kept = torch.where(dense, t["be"], k)
            counts = dict(zip(names, kept.tolist()))
            now = achieved(ctx, counts)
            # Ratio: hard cost in the value, the soft cost K rho (m + n) in the gradient.
            soft_cost = t["K"] * rho * t["width"]
            hard_cost = torch.where(dense, t["dense"], k * t["width"]).to(rho.dtype)
            ratio = (offset + (hard_cost + soft_cost - soft_cost.detach()).sum()) / denom
            ratio_loss = (ratio - cfg.ratio) ** 2
            # Guidance: compressed layers whose truncation error exceeds their saving.
            error = tails.gather(1, k[:, None]).squeeze(1)                # (L,)
            saving = 1 - k * t["width"] / t["dense"]
            flag = (~dense & (error > saving)).to(rho.dtype)
            guide = (flag * F.relu(1 / cfg.k_factor - rho)).mean()
            task = objective(next(batches))
            loss = task + cfg.alpha * ratio_loss + cfg.beta * guide
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with one_thread():
                opt.step()
            emit(ctx, {"type": "step", "step": step, "loss": loss.item(),
                       "loss_task": task.item(), "loss_ratio": ratio_loss.item(),
                       "loss_guide": guide.item(), "ratio_linear": now["linear"],
                       "ratio_model": now["model"], "target_ratio": cfg.ratio,
                       "dense_layers": int(dense.sum()), "ranks": counts,
                       "seconds": clock.seconds})
            if cfg.mask_every and step % cfg.mask_every == 0 and ctx.callback is not None:
                sm = soft.detach().cpu()
                emit(ctx, {"type": "masks", "step": step,
                           "probs": {n: sm[i, :K[n]].tolist() for i, n in enumerate(names)}})

    with torch.no_grad():
        rho = dict(zip(names, soft_masks(logits, c, J)[1].cpu().tolist()))
    counts, scale = rescale_counts(rho, K, shapes, budget, cfg.k_factor)
    plan = ctx.prefix_plan(counts, "ara", cfg, steps=step, stopped=stopped,
                           seconds=clock.seconds, objective=objective.kind, scale=scale,
                           fractions=rho)
    emit(ctx, {"type": "done", "step": step, "plan": plan.to_dict(), "stopped": stopped})
    return plan


select_ara.preferred_decomposition = "whiten"    # the paper's (SVD-LLM) factors
