"""LLRC: learned any-k / top-k masks over singular values (arXiv 2512.13733).

One logit per singular value per layer (initialised ``linspace(6, 3, r)``: every gate open;
``init="uniform"``: the uniform ranks on the budget open, the rest closed), all model weights
frozen. Each step samples Gumbel-Sigmoid gates (hard in the forward pass, straight-through
gradients; ``gates.py``) and minimises

    beta_c * L_compression + alpha(t) * L_distill + beta_tv * L_TV

* ``L_compression``: the differentiable expected parameter ratio (in the chosen scope) against
  the target, ``(E[rho] - target) / (1 - target)``: a steady push while the ratio is above the
  target (the paper uses the mean logit; the expected count is the sound choice it allows).
* ``L_distill``: normalised MSE between the masked and the original model's hidden states at
  the middle block and the last layer (``distill_at="every"``: every block's output, averaged);
  targets precomputed once (``distill.py``). The paper does not say MSE or normalised MSE:
  ``distill_loss`` picks. ``pooled`` compares what a mean-pooling sentence encoder outputs,
  the cosine of span means; by default (``auto``) an encoder distils its last state that way
  (``distill_setting``). ``objective="lm"`` swaps in the next-token loss (the paper's
  ablation).
* ``L_TV``: total variation along the singular index of the expected mask ``sigmoid(theta)``
  (contiguous selections). On the noisy soft samples it mostly pushed logits to extremes and
  did not reduce the number of 0/1 transitions; on the expected mask it does.
* ``alpha(t)``: cosine cyclical schedule between ``alpha_low`` and ``alpha_high``.
* ``dense_switch`` (off by default): a layer whose sampled mask keeps break-even values or
  more runs with all of them, as the plan will store it (``gates.dense_switch``).

Once the deterministic ratio (gates ``theta > 0``, break-even rule applied) reaches the target,
``hold_steps`` more steps run with the compression term off while the ratio stays within
``tolerance``; then the masks freeze. The hard gates sample ``theta + noise > 0`` whatever
``tau`` is (``tau`` only shapes the straight-through gradient), so ``noise_final`` < 1
shrinks the noise over the holding towards the deterministic gates the plan keeps. The
final plan keeps exactly the open indices, nudged by logit order onto the parameter budget
(``land_on_budget``); with ``hold_vote`` the deterministic masks of the last held steps
vote instead, a vote of seeds (``vote.py``) inside one run. The loop, events and checkpoints
are the shared ones (``learned.train_masks``); noise and batches are seeded per step, so a
stopped run resumes to the same plan.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import distill, gates
from ..config import option
from ..counting import break_even
from ..models import find_blocks
from .base import SelectionContext, kept_on_budget, majority_on_budget
from .learned import MaskTrainer, TrainConfig, achieved, check_fields, register_learned
from .objective import Objective, step_generator
from .uniform import uniform_ranks


INITS = ("open", "uniform")


@dataclass
class LLRCConfig(TrainConfig):
    objectives = ("distill", "lm")

    selection: str = option("any-k", "any-k (each singular value its own gate) or top-k (a "
                        "learned prefix per layer)")
    steps: int = option(400, "maximum training steps")
    lr: float = option(0.1, "AdamW learning rate on the mask logits")
    lr_final: float = option(0.01, "learning rate reached, by a cosine, at the end of holding")
    tau: float = option(0.3, "Gumbel-Sigmoid temperature")
    beta_c: float = option(1.0, "weight of the compression term")
    beta_tv: float = option(0.5, "weight of the total-variation term (0 disables)")
    alpha_low: float = option(0.2, "distillation weight at the trough of the cosine cycle")
    alpha_high: float = option(1.0, "distillation weight at the crest of the cosine cycle")
    alpha_period: int = option(50, "steps per cosine cycle of alpha(t) (0: constant alpha_high)")
    objective: str = option("distill", "distill (hidden states) or lm (next-token loss ablation)")
    distill_loss: str = option("auto", "nmse (normalised MSE), mse, or pooled[:SPAN] (1 - cosine "
                               "of the means of SPAN-token spans, default 32: the sentence "
                               "embeddings of a mean-pooling encoder), or kl (the last state "
                               "through the LM head: KL of the next-token distributions; "
                               "earlier states by nmse); auto: nmse for a model "
                               "with an LM head, pooled for an encoder (measured best)")
    distill_at: str = option("auto", "hidden states distilled: middle-last (the "
                             "paper: the middle block's output and the last) or every (every "
                             "block's output: no block after the middle goes unwatched) "
                             "or last (the last alone, as ARS and ARA distil an encoder); "
                             "auto: middle-last for a model with an LM head, last for an "
                             "encoder (measured best)")
    hold_steps: int = option(300, "steps (in all) at or under the target with the compression term off")
    noise_final: float = option(1.0, "scale of the gates' logistic noise reached, by a cosine, "
                                "at the end of holding (1: no annealing; 0: the last steps "
                                "train the deterministic masks the plan keeps)")
    hold_vote: float = option(0.0, "share of the holding, at its end, whose deterministic "
                              "masks vote on the plan: each value scores the share of those "
                              "steps it was open, each layer starts from its majority (0: the "
                              "final logits alone)")
    tolerance: float = option(0.005, "allowed ratio drift above the target while holding")
    batch_size: int = option(4, "calibration windows per step")
    train_seq_len: int = option(128, "tokens of each window used per step (0: whole window)")
    init: str = option("open", "open (every gate open: linspace(logit_high, logit_low)) or "
                       "uniform (the uniform ranks on the budget open, +-logit_low: "
                       "training only moves the budget between layers)")
    logit_high: float = option(6.0, "initial logit of the first singular value")
    logit_low: float = option(3.0, "initial logit of the last singular value")
    seed: int = option(0, "seed for noise and batch order (per step: resumable)")
    dense_switch: bool = option(False, "a layer whose open gates reach break-even runs "
                                "with every singular value in training, as it will be stored")
    path: str = option("auto", "masked matmul: auto (cheaper per layer), dense or factorised")
    activation_checkpointing: bool = option(False, "recompute block activations in backward")
    bf16: bool = option(False, "bfloat16 autocast (CUDA)")

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, positive=("tau",))
        if not 0.0 <= self.hold_vote <= 1.0:
            raise ValueError(f"hold_vote must be in [0, 1] (a share of the holding), got "
                             f"{self.hold_vote}")
        if not 0.0 <= self.noise_final <= 1.0:
            raise ValueError(f"noise_final must be in [0, 1] (a scale of the gates' noise), got "
                             f"{self.noise_final}")
        if self.distill_at not in (*distill.DISTILL_AT, "auto"):
            raise ValueError(f"distill_at must be one of {distill.DISTILL_AT}, got "
                             f"{self.distill_at!r}")
        if self.distill_loss not in ("auto", "nmse", "mse", "kl") and \
                not self.distill_loss.startswith("pooled"):
            raise ValueError(f"distill_loss must be 'nmse', 'mse', 'kl' or 'pooled[:SPAN]', got "
                             f"{self.distill_loss!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.path not in ("auto", "dense", "factorised"):
            raise ValueError(f"path must be auto, dense or factorised, got {self.path!r}")


def distill_setting(model: nn.Module, at: str, loss: str) -> tuple[str, str]:
    """``(distill_at, distill_loss)`` with ``auto`` resolved by the kind of model, each the
    best measured (``bench/README.md``): a model with an LM head, the paper's middle and last
    states by normalised MSE (demo model); an encoder, the last state by the cosine of its
    mean-pooled spans, what a sentence encoder outputs (MiniLM: 0.861 +- 0.003 embedding
    fidelity at rho 0.8 against 0.819 +- 0.019, 3 seeds)."""
    encoder = not distill.has_lm_head(model)
    return ((("last" if encoder else "middle-last") if at == "auto" else at),
            (("pooled" if encoder else "nmse") if loss == "auto" else loss))


class _Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


class LLRCTrainer(MaskTrainer):
    """One logit per singular value per layer; the compression / distillation / TV loss."""

    def __init__(self, ctx: SelectionContext, cfg: LLRCConfig, budget: int):
        super().__init__(ctx, cfg, budget)
        device = self.device
        if cfg.init == "uniform":
            start = uniform_ranks(ctx, budget)[0]
            logits = [gates.init_at(ctx.factors[n].rank, start[n], cfg.logit_low)
                      for n in self.names]
        else:
            logits = [gates.init_logits(ctx.factors[n].rank, cfg.logit_high, cfg.logit_low)
                      for n in self.names]
        self.theta = nn.ParameterList(nn.Parameter(t.to(device)) for t in logits)
        self.optimizer = torch.optim.AdamW(self.theta.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.phase, self.held, self.step = "compress", 0, 0
        # hold_vote: per value, the held steps it was open in (CPU: a count per gate)
        self.open_steps = {n: torch.zeros(ctx.factors[n].rank) for n in self.names}
        self.votes = 0
        _, self.blocks = find_blocks(ctx.model)  # before the swap: blocks hold nn.Linear
        self.break_even = {n: break_even(*ctx.shapes[n]) for n in self.names}

    def make_objective(self) -> Objective:
        """Distillation at the middle block and the last layer (an encoder: the last, pooled),
        or as ``distill_at`` / ``distill_loss`` say, or the ``lm`` ablation; on the first
        ``train_seq_len`` tokens of each window."""
        cfg, model = self.cfg, self.ctx.model
        at, loss = distill_setting(model, cfg.distill_at, cfg.distill_loss)
        return Objective(model, self.ctx.windows, cfg.objective, cfg.batch_size,
                         layers=distill.distill_layers(model, at), distance=loss,
                         seq_len=cfg.train_seq_len, bf16=cfg.bf16,
                         targets_device=self.ctx.targets_device())

    def prepare(self, stack: ExitStack, layers) -> None:
        for layer in layers.values():
            layer.path = self.cfg.path
        if self.cfg.activation_checkpointing:
            blocks, originals = self.blocks, list(self.blocks)
            for i, b in enumerate(originals):
                blocks[i] = _Checkpointed(b)
            stack.callback(lambda: [blocks.__setitem__(i, b) for i, b in enumerate(originals)])

    # --- accounting -------------------------------------------------------------------------
    def kept(self) -> dict[str, list[int]]:
        return {n: gates.kept_indices(t.detach().cpu(), self.cfg.selection)
                for n, t in zip(self.names, self.theta)}

    def expected_ratio(self) -> torch.Tensor:
        cost = 0.0
        for n, t in zip(self.names, self.theta):
            m, k = self.ctx.shapes[n]
            c = gates.expected_kept(t, self.cfg.selection) * (m + k)
            cost = cost + c - (c - m * k).clamp_min(0).detach()   # value min(c, mn), grad linear
        d, tot = self.ctx.dense_linear, self.ctx.total_params
        return cost / d if self.cfg.scope == "linear" else (tot - d + cost) / tot

    # --- one step ---------------------------------------------------------------------------
    def loss(self, layers, step: int):
        cfg = self.cfg
        self.step = step
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, self.objective.windows.shape[0], (cfg.batch_size,), generator=gen)
        tv, scale = 0.0, self.held_cosine(1.0, cfg.noise_final)
        for n, t in zip(self.names, self.theta):
            noise = gates.logistic_noise(t.shape, gen) * scale
            mask, _ = gates.gate(t, cfg.tau, noise, cfg.selection)
            layers[n].mask = gates.dense_switch(mask, self.break_even[n]) \
                if cfg.dense_switch else mask
            tv = tv + gates.total_variation(torch.sigmoid(t))    # of the expected mask
        tv = tv / len(self.names)
        fit = self.objective(idx)
        comp = (self.expected_ratio() - cfg.ratio) / max(1.0 - cfg.ratio, 1e-3)
        alpha = gates.cosine_alpha(step, cfg.alpha_period, cfg.alpha_low, cfg.alpha_high)
        on = 1.0 if self.phase == "compress" else 0.0
        loss = on * cfg.beta_c * comp + alpha * fit + cfg.beta_tv * tv
        return loss, {"loss_compression": comp.item(), "loss_distill": fit.item(),
                      "loss_tv": float(tv.detach()), "alpha": alpha, "tau": cfg.tau,
                      "noise": scale}

    def held_cosine(self, start: float, end: float) -> float:
        """``start`` while compressing; a cosine from ``start`` to ``end`` over the holding
        (the learning rate's and the noise scale's schedule)."""
        if self.phase == "compress":
            return start
        frac = min(self.held / max(self.cfg.hold_steps, 1), 1.0)
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))

    def current_lr(self) -> float:
        return self.held_cosine(self.cfg.lr, self.cfg.lr_final)

    def optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr()
        super().optimizer_step()

    def update(self):
        cfg = self.cfg
        kept = self.kept()
        counts = {n: len(k) for n, k in kept.items()}
        r = achieved(self.ctx, counts)[cfg.scope]
        if self.phase == "compress" and r <= cfg.ratio:
            # Momentum would carry the push past the target: start holding from rest.
            # ``held`` counts every step spent holding, across re-entries.
            self.phase = "hold"
            self.optimizer.state.clear()
        elif self.phase == "hold":
            if r > cfg.ratio + cfg.tolerance:
                self.phase = "compress"
            else:
                self.held += 1
        if self.phase == "hold" and cfg.hold_vote > 0 and \
                self.held >= (1.0 - cfg.hold_vote) * cfg.hold_steps:
            for n, idx in kept.items():
                self.open_steps[n][idx] += 1
            self.votes += 1
        return counts, {"phase": self.phase}

    def finished(self) -> bool:
        return self.phase == "hold" and self.held >= self.cfg.hold_steps

    def mask_probs(self):
        return {n: torch.sigmoid(t.detach()).cpu().tolist() for n, t in zip(self.names, self.theta)}

    def finalise(self):
        """The open gates, landed on the budget by logit order: while over it, close the open
        gate with the lowest logit; then open the closed gate with the highest logit while it
        fits (top-k: the prefix follows the count). With ``hold_vote``, the held steps'
        deterministic masks vote instead: each layer starts from the values open in most of
        them and lands by the share of steps a value was open, ties by logit."""
        theta = {n: t.detach().cpu() for n, t in zip(self.names, self.theta)}
        if not self.votes:
            counts = {n: len(k) for n, k in self.kept().items()}
            return kept_on_budget(theta, counts, self.ctx.shapes, self.budget,
                                  self.cfg.selection), {}
        v = self.votes
        tie = {n: torch.sigmoid(t) * v / (v + 1) for n, t in theta.items()}   # by logit
        return majority_on_budget(self.open_steps, v, tie, self.ctx.shapes, self.budget,
                                  self.cfg.selection), {"hold_votes": v}

    def state_dict(self) -> dict:
        return {"theta": [t.detach().cpu() for t in self.theta], "phase": self.phase,
                "held": self.held, "open_steps": [self.open_steps[n] for n in self.names],
                "votes": self.votes}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for t, s in zip(self.theta, state["theta"]):
                t.copy_(s)
        self.phase, self.held = state["phase"], state["held"]
        self.open_steps = {n: t.cpu() for n, t in zip(self.names, state["open_steps"])}
        self.votes = state["votes"]


# Whitened factors by measurement, not the paper's ASVD: on the demo model, 3 seeds, ppl
# 93.62 / 94.14 / 97.35 at rho 0.9 / 0.8 / 0.6 against 95.92 / 102.48 / 127.86 on ASVD
# factors and SVD-LLM's 94.81 / 96.39 / 98.58 (bench/README.md, ablations.py).
select_llrc = register_learned("llrc", LLRCConfig, LLRCTrainer, selections=("top-k", "any-k"),
                               preferred="whiten")
