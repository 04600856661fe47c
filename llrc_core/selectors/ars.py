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
bisection so the budget holds, then +1 steps to the highest next logit (``land_on_budget``)
land within one step of the budget. Break-even is applied by the plan.

The loop, events and checkpoints are the shared ones (``learned.train_masks``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import gates
from .base import (SelectionContext, bisect_monotone, land_on_budget,
                   ranks_cost)
from ..config import option
from ..threads import one_thread
from .learned import (MaskTrainer, TrainConfig, achieved, check_fields, other_params,
                      register_learned)
from .objective import EpochBatches


@dataclass
class ARSConfig(TrainConfig):
    lr: float = option(1e-2, "Adam learning rate (hypernetwork)")
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

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, positive=("noise_dim", "hidden", "tau", "p"),
                     nonneg=("lam", "gamma", "tol"))
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
    return land_on_budget(counts_at(x), shapes, budget,
                          lambda n, k: float(ranked[n][k]) if k < len(ranked[n]) else -1e30)


# --- the trainer ------------------------------------------------------------------------
class ARSTrainer(MaskTrainer):
    """The hypernetwork's logits, Gumbel-Sigmoid masks, the log-ratio and alignment terms."""

    def __init__(self, ctx: SelectionContext, cfg: ARSConfig, budget: int):
        super().__init__(ctx, cfg, budget)
        names, device = self.names, self.device
        self.ranks = [ctx.factors[n].rank for n in names]
        with torch.random.fork_rng(devices=[]):       # seeded init, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.hyper = HyperNet(self.ranks, cfg.noise_dim, cfg.hidden, cfg.bias_init).to(device)
        self.optimizer = torch.optim.Adam(self.hyper.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)             # Gumbel noise
        self.batches = EpochBatches(ctx.windows.shape[0], cfg.batch_size, cfg.seed)
        s_norm = torch.zeros(len(names), max(self.ranks))                  # (L, r_max)
        for i, n in enumerate(names):
            S = ctx.factors[n].S.float().cpu()
            s_norm[i, :self.ranks[i]] = S / S[0].clamp_min(1e-12)
        self.s_norm = s_norm.to(device)
        self.rank_t = torch.tensor(self.ranks, dtype=torch.float32, device=device)   # (L,)
        self.width = torch.tensor([sum(ctx.shapes[n]) for n in names], dtype=torch.float32,
                                  device=device)                          # (L,) m + n
        self.denom = ctx.dense_linear if cfg.scope == "linear" else ctx.total_params
        self.offset = 0 if cfg.scope == "linear" else other_params(ctx)
        self.p = min(cfg.p, cfg.ratio)

    def loss(self, layers, step: int):
        cfg = self.cfg
        with one_thread():
            self.logits = self.hyper()                                    # (L, r_max)
        # Two-stage backward: the model's graph on all threads, then the hypernetwork's
        # from the logits' gradient on one thread (see ``one_thread``).
        self.leaf = self.logits.detach().requires_grad_(True)
        noise = gates.logistic_noise(self.leaf.shape, self.gen)
        mask, _ = gates.gumbel_sigmoid(self.leaf, cfg.tau, noise)          # (L, r_max)
        for i, n in enumerate(self.names):
            layers[n].mask = mask[i, :self.ranks[i]]
        kept = mask.sum(-1)                                                # (L,)
        self.counts = dict(zip(self.names, kept.detach().round().long().tolist()))
        lam = 0.0 if achieved(self.ctx, self.counts)[cfg.scope] <= cfg.ratio + cfg.tol \
            else cfg.lam
        task = self.objective(next(self.batches))
        reg = log_ratio_reg((self.offset + (kept * self.width).sum()) / self.denom, self.p)
        align = alignment(mask, self.s_norm, self.rank_t)
        loss = task + lam * reg + cfg.gamma * align
        return loss, {"loss_task": task.item(), "loss_reg": reg.item(),
                      "loss_align": align.item(), "lambda": lam, "tau": cfg.tau}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        with one_thread():
            self.logits.backward(self.leaf.grad)

    def update(self):
        return self.counts, {}

    def mask_probs(self):
        probs = torch.sigmoid(self.leaf.detach()).cpu()                   # P(logit + g > 0)
        return {n: probs[i, :self.ranks[i]].tolist() for i, n in enumerate(self.names)}

    def finalise(self):
        with torch.no_grad(), one_thread():
            final = self.hyper().float().cpu()
        scores = {n: final[i, :self.ranks[i]] for i, n in enumerate(self.names)}
        counts = threshold_counts(scores, self.ctx.shapes, self.budget)
        return gates.kept_by_score(scores, counts, self.cfg.selection), {}

    def state_dict(self) -> dict:
        return {"hyper": self.hyper.state_dict(), "gen": self.gen.get_state(),
                "drawn": self.batches.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.hyper.load_state_dict(state["hyper"])
        self.gen.set_state(state["gen"])
        self.batches.skip_to(state["drawn"])


select_ars = register_learned("ars", ARSConfig, ARSTrainer, selections=("top-k", "any-k"),
                              preferred="asvd")
