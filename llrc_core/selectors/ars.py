"""ARS — adaptive rank selection (Gao et al., NAACL 2024), fine-tuning-free.

A small hypernetwork emits one logit per singular value per target layer:
fixed noise ``z (L x noise_dim)`` -> bidirectional GRU (``hidden``) -> LayerNorm -> GELU ->
per-layer linear head (``r_l`` logits) + ``bias_init`` (3: training starts near full rank).
Only the hypernetwork trains; the model's weights are frozen.

Mask: straight-through hard threshold (> 0.5) of the Gumbel-Sigmoid
``sigmoid((logit + g) / tau)``, with ``g`` logistic noise (difference of two Gumbels: the
binary Concrete relaxation).

Loss = objective + lambda * log(max(R, p) / p) + gamma * alignment, where
* ``R`` is the sampled mask's parameter ratio in ``cfg.scope`` counting every layer as
  factorised, ``sum(mask) (m + n)`` (no break-even, so it is differentiable and never flat),
  as the public code does; ``p = min(cfg.p, cfg.ratio)`` is the regulariser's floor;
* lambda is switched off while the true ratio (break-even rule) is at most
  ``target + tol``. The public code switches it off only within ``|ratio - target| < tol``;
  switching off below the target too stops the regulariser pushing past it;
* alignment = mean over layers of ``mean_i ((mask_i - prefix_i) S_i / S_0)^2`` with
  ``prefix`` the first ``sum(mask)`` indices (pushes masks towards sorted order). ``S`` is
  divided by ``S_0`` so gamma means the same for every decomposition.

Finalise (our choice; the paper fine-tunes instead): the noise-free logits rank each layer's
singular values. A layer keeps as many values as have a logit above one global threshold
(top-k: that many leading indices; any-k: exactly those indices), the threshold found by
bisection so the budget holds, then +1 steps to the highest next logit (``fill_budget``)
land within one step of the budget. Break-even is applied by the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import (SelectConfig, SelectionContext, bisect_monotone, check_reachable,
                   fill_budget, ranks_cost, register_selector)
from .learned import (Clock, Objective, achieved, batch_indices, check_context, check_fields,
                      emit, masked_session, one_thread, other_params)


@dataclass
class ARSConfig(SelectConfig):
    steps: int = field(default=300, metadata={"help": "training steps of the hypernetwork"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (hypernetwork)"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per step"})
    noise_dim: int = field(default=32, metadata={"help": "size of the fixed noise per layer"})
    hidden: int = field(default=64, metadata={"help": "GRU hidden size (each direction)"})
    tau: float = field(default=0.4, metadata={"help": "Gumbel-Sigmoid temperature"})
    lam: float = field(default=16.0, metadata={"help": "weight of the log-ratio regulariser"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the alignment term"})
    p: float = field(default=0.4, metadata={
        "help": "floor of the log-ratio regulariser (capped at the target ratio)"})
    tol: float = field(default=0.002, metadata={
        "help": "lambda is off while the ratio is at most target + tol"})
    bias_init: float = field(default=3.0, metadata={
        "help": "added to every logit so training starts near full rank"})
    objective: str = field(default="auto", metadata={
        "help": "'lm' (next-token CE), 'distill' (last hidden-state MSE) or 'auto' "
                "(lm when the model has an LM head)"})
    seed: int = field(default=0, metadata={"help": "noise, initialisation and batch order"})
    mask_every: int = field(default=50, metadata={
        "help": "emit a 'masks' event every this many steps (0: never)"})

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, positive=("steps", "lr", "batch_size", "noise_dim", "hidden", "tau",
                                     "p"),
                     nonneg=("lam", "gamma", "tol", "mask_every"))
        if self.p > 1:
            raise ValueError(f"p must be in (0, 1], got {self.p}")


class HyperNet(nn.Module):
    """Fixed noise -> BiGRU -> LayerNorm -> GELU -> one linear head per layer.

    The heads are stored as one zero-padded batch ``(L, r_max, 2 hidden)`` (each initialised
    like its own ``nn.Linear``): one batched product instead of one call per layer.
    """

    def __init__(self, ranks: list[int], noise_dim: int, hidden: int, bias: float):
        super().__init__()
        L, r_max, h2 = len(ranks), max(ranks), 2 * hidden
        self.register_buffer("z", torch.randn(1, L, noise_dim))            # (1, L, noise)
        self.gru = nn.GRU(noise_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(h2)
        bound = 1 / math.sqrt(h2)                                          # nn.Linear's init
        self.weight = nn.Parameter(torch.empty(L, r_max, h2).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(L, r_max).uniform_(-bound, bound))
        self.register_buffer("valid", torch.arange(r_max)[None, :] < torch.tensor(ranks)[:, None])
        self.bias = bias

    def forward(self) -> torch.Tensor:
        h = F.gelu(self.norm(self.gru(self.z)[0]))[0]                      # (L, 2 hidden)
        logits = torch.einsum("lrh,lh->lr", self.weight, h) + self.head_bias + self.bias
        return logits.masked_fill(~self.valid, -1e4)                       # (L, r_max)


# --- pure maths (padded (L, r_max) tensors; padding has logit -1e4, mask 0) ---------------
def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """Hard 0/1 mask in the forward pass, Gumbel-Sigmoid gradient in the backward pass."""
    u = torch.rand(logits.shape, generator=gen).clamp(1e-6, 1 - 1e-6).to(logits.device)
    soft = torch.sigmoid((logits + torch.log(u / (1 - u))) / tau)         # logistic noise
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def prefix_like(mask: torch.Tensor) -> torch.Tensor:
    """Prefix masks with as many ones per row as ``mask`` has (no gradient)."""
    k = mask.detach().sum(-1).round()                                      # (L,)
    return (torch.arange(mask.shape[-1], device=mask.device) < k[..., None]).to(mask.dtype)


def alignment(mask: torch.Tensor, s_norm: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ``mean_i ((m_i - prefix_i) s_i)^2``: zero for prefix masks.
    ``s_norm`` is zero-padded like ``mask``; ``ranks`` (L,) are the true lengths."""
    return ((((mask - prefix_like(mask)) * s_norm) ** 2).sum(-1) / ranks).mean()


def log_ratio_reg(ratio: torch.Tensor, p: float) -> torch.Tensor:
    """``log(max(R, p) / p)``: zero at or below ``p``, grows with ``R`` above it."""
    return torch.log(ratio.clamp_min(p) / p)


def threshold_counts(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     budget: int) -> dict[str, int]:
    """Per-layer counts of scores above one global threshold, bisected to fit ``budget``,
    then +1 steps to the highest next score."""
    ranked = {n: torch.sort(s.double(), descending=True).values for n, s in scores.items()}
    top = max(float(s[0]) for s in ranked.values()) + 1.0
    bottom = min(float(s[-1]) for s in ranked.values()) - 1.0

    def counts_at(x: float) -> dict[str, int]:      # threshold -x: more kept as x grows
        return {n: max(1, int((s > -x).sum())) for n, s in ranked.items()}

    x = bisect_monotone(lambda x: ranks_cost(counts_at(x), shapes), budget, -top, -bottom)
    return fill_budget(counts_at(x), shapes, budget,
                       lambda n, k: float(ranked[n][k]) if k < len(ranked[n]) else -1e30)


def kept_from_counts(scores: dict[str, torch.Tensor], counts: dict[str, int],
                     selection: str) -> dict[str, list[int]]:
    if selection == "top-k":
        return {n: list(range(k)) for n, k in counts.items()}
    return {n: sorted(torch.argsort(scores[n], descending=True, stable=True)[:k].tolist())
            for n, k in counts.items()}


# --- orchestration ------------------------------------------------------------------------
@register_selector("ars", ARSConfig)
def select_ars(ctx: SelectionContext, cfg: ARSConfig):
    check_context(ctx, "ARS")
    budget = ctx.budget(cfg.ratio, cfg.scope)
    check_reachable(ctx, budget)
    names = list(ctx.shapes)
    objective = Objective(ctx.model, ctx.windows, cfg.objective, cfg.batch_size)
    device = objective.device
    ranks = [ctx.factors[n].rank for n in names]
    with torch.random.fork_rng(devices=[]):       # seeded init, global RNG untouched
        torch.manual_seed(cfg.seed)
        hyper = HyperNet(ranks, cfg.noise_dim, cfg.hidden, cfg.bias_init).to(device)
    opt = torch.optim.Adam(hyper.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)                   # Gumbel noise
    s_norm = torch.zeros(len(names), max(ranks))                        # (L, r_max)
    for i, n in enumerate(names):
        S = ctx.factors[n].S.float().cpu()
        s_norm[i, :ranks[i]] = S / S[0].clamp_min(1e-12)
    s_norm = s_norm.to(device)
    rank_t = torch.tensor(ranks, dtype=torch.float32, device=device)    # (L,)
    width = torch.tensor([sum(ctx.shapes[n]) for n in names], dtype=torch.float32,
                         device=device)                                 # (L,) m + n
    denom = ctx.dense_linear if cfg.scope == "linear" else ctx.total_params
    offset = 0 if cfg.scope == "linear" else other_params(ctx)
    p = min(cfg.p, cfg.ratio)
    clock, stopped, step = Clock(), False, 0

    with masked_session(ctx.model, {n: ctx.factors[n] for n in names}) as layers:
        batches = batch_indices(ctx.windows.shape[0], cfg.batch_size, cfg.seed)
        for step in range(1, cfg.steps + 1):
            if ctx.should_stop():
                stopped, step = True, step - 1
                break
            with one_thread():
                logits = hyper()                                        # (L, r_max)
            # Two-stage backward: the model's graph on all threads, then the hypernetwork's
            # from the logits' gradient on one thread (see ``one_thread``).
            leaf = logits.detach().requires_grad_(True)
            mask = gumbel_sigmoid_st(leaf, cfg.tau, gen)                # (L, r_max)
            for i, n in enumerate(names):
                layers[n].mask = mask[i, :ranks[i]]
            kept = mask.sum(-1)                                         # (L,)
            counts = dict(zip(names, kept.detach().round().long().tolist()))
            now = achieved(ctx, counts)
            lam = 0.0 if now[cfg.scope] <= cfg.ratio + cfg.tol else cfg.lam
            task = objective(next(batches))
            reg = log_ratio_reg((offset + (kept * width).sum()) / denom, p)
            align = alignment(mask, s_norm, rank_t)
            loss = task + lam * reg + cfg.gamma * align
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with one_thread():
                logits.backward(leaf.grad)
                opt.step()
            emit(ctx, {"type": "step", "step": step, "loss": loss.item(),
                       "loss_task": task.item(), "loss_reg": reg.item(),
                       "loss_align": align.item(), "lambda": lam, "tau": cfg.tau,
                       "ratio_linear": now["linear"], "ratio_model": now["model"],
                       "target_ratio": cfg.ratio, "ranks": counts, "seconds": clock.seconds})
            if cfg.mask_every and step % cfg.mask_every == 0 and ctx.callback is not None:
                probs = torch.sigmoid(leaf.detach()).cpu()     # P(logit + g > 0)
                emit(ctx, {"type": "masks", "step": step,
                           "probs": {n: probs[i, :ranks[i]].tolist()
                                     for i, n in enumerate(names)}})
        with torch.no_grad(), one_thread():
            final = hyper().float().cpu()
    scores = {n: final[i, :ranks[i]] for i, n in enumerate(names)}

    counts = threshold_counts(scores, ctx.shapes, budget)
    plan = ctx.plan(kept_from_counts(scores, counts, cfg.selection), "ars", cfg,
                    steps=step, stopped=stopped, seconds=clock.seconds,
                    objective=objective.kind)
    emit(ctx, {"type": "done", "step": step, "plan": plan.to_dict(), "stopped": stopped})
    return plan
