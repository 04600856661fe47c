"""LLRC: learned any-k / top-k masks over singular values (arXiv 2512.13733).

One logit per singular value per layer (initialised ``linspace(6, 3, r)``), all model weights
frozen. Each step samples Gumbel-Sigmoid gates (hard in the forward pass, straight-through
gradients; ``gates.py``) and minimises

    beta_c * L_compression + alpha(t) * L_distill + beta_tv * L_TV

* ``L_compression``: the differentiable expected parameter ratio (in the chosen scope) against
  the target, ``(E[rho] - target) / (1 - target)``: a steady push while the ratio is above the
  target (the paper uses the mean logit; the expected count is the sound choice it allows).
* ``L_distill``: normalised MSE between the masked and the original model's hidden states at
  the middle block and the last layer; targets precomputed once (``distill.py``). The paper
  does not say MSE or normalised MSE: ``distill_loss`` picks. ``objective="lm"`` swaps in the
  next-token loss (the paper's ablation).
* ``L_TV``: total variation along the singular index of the expected mask ``sigmoid(theta)``
  (contiguous selections). On the noisy soft samples it mostly pushed logits to extremes and
  did not reduce the number of 0/1 transitions; on the expected mask it does.
* ``alpha(t)``: cosine cyclical schedule between ``alpha_low`` and ``alpha_high``.

Once the deterministic ratio (gates ``theta > 0``, break-even rule applied) reaches the target,
``hold_steps`` more steps run with the compression term off while the ratio stays within
``tolerance``; then the masks freeze. The final plan keeps exactly the open indices, nudged by
logit order onto the parameter budget. Checkpoints (``torch.load(weights_only=True)``) let a
stopped run resume to the same plan; noise and batches are seeded per step for that.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import distill, gates
from ..counting import layer_cost
from ..errors import TrainingError
from ..models import find_blocks
from .base import SelectConfig, SelectionContext, register_selector
from .learned import achieved, masked_session


def _f(default, help_):
    return field(default=default, metadata={"help": help_})


@dataclass
class LLRCConfig(SelectConfig):
    supported_selections = ("top-k", "any-k")

    selection: str = _f("any-k", "any-k (each singular value its own gate) or top-k (a "
                        "learned prefix per layer)")
    steps: int = _f(400, "maximum training steps")
    lr: float = _f(0.1, "AdamW learning rate on the mask logits")
    lr_final: float = _f(0.01, "learning rate reached, by a cosine, at the end of holding")
    tau: float = _f(0.3, "Gumbel-Sigmoid temperature")
    beta_c: float = _f(1.0, "weight of the compression term")
    beta_tv: float = _f(0.5, "weight of the total-variation term (0 disables)")
    alpha_low: float = _f(0.2, "distillation weight at the trough of the cosine cycle")
    alpha_high: float = _f(1.0, "distillation weight at the crest of the cosine cycle")
    alpha_period: int = _f(50, "steps per cosine cycle of alpha(t) (0: constant alpha_high)")
    objective: str = _f("distill", "distill (hidden states) or lm (next-token loss ablation)")
    distill_loss: str = _f("nmse", "nmse (normalised MSE) or mse")
    hold_steps: int = _f(300, "steps (in all) at or under the target with the compression term off")
    tolerance: float = _f(0.005, "allowed ratio drift above the target while holding")
    batch_size: int = _f(4, "calibration windows per step")
    train_seq_len: int = _f(128, "tokens of each window used per step (0: whole window)")
    logit_high: float = _f(6.0, "initial logit of the first singular value")
    logit_low: float = _f(3.0, "initial logit of the last singular value")
    mask_every: int = _f(10, "emit per-layer mask probabilities every N steps")
    seed: int = _f(0, "seed for noise and batch order (per step: resumable)")
    checkpoint: str | None = _f(None, "file for the mask state; a run resumes from it")
    checkpoint_every: int = _f(50, "steps between checkpoints")
    log_path: str | None = _f(None, "JSONL file receiving every event")
    path: str = _f("auto", "masked matmul: auto (cheaper per layer), dense or factorised")
    activation_checkpointing: bool = _f(False, "recompute block activations in backward")
    bf16: bool = _f(False, "bfloat16 autocast (CUDA)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.objective not in ("distill", "lm"):
            raise ValueError(f"objective must be 'distill' or 'lm', got {self.objective!r}")
        if self.distill_loss not in ("nmse", "mse"):
            raise ValueError(f"distill_loss must be 'nmse' or 'mse', got {self.distill_loss!r}")
        if self.path not in ("auto", "dense", "factorised"):
            raise ValueError(f"path must be auto, dense or factorised, got {self.path!r}")


# Fields that may differ between a checkpointed run and its resumption.
_RESUME_FREE = {"steps", "checkpoint", "checkpoint_every", "log_path", "mask_every"}


class _Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


class LLRCRun:
    """One training run over a selection context; ``run()`` returns the rank plan."""

    def __init__(self, ctx: SelectionContext, cfg: LLRCConfig):
        if ctx.model is None or ctx.windows is None:
            raise ValueError("LLRC needs the model and calibration windows (--calib)")
        self.ctx, self.cfg = ctx, cfg
        self.names = list(ctx.shapes)
        self.device = next(ctx.model.parameters()).device
        self.theta = nn.ParameterList(
            nn.Parameter(gates.init_logits(ctx.factors[n].rank, cfg.logit_high,
                                           cfg.logit_low).to(self.device))
            for n in self.names)
        self.opt = torch.optim.AdamW(self.theta.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.step, self.phase, self.held = 0, "compress", 0
        self.budget = ctx.budget(cfg.ratio, cfg.scope)
        self.t0 = time.time()

    # --- accounting -------------------------------------------------------------------------
    def kept(self) -> dict[str, list[int]]:
        return {n: gates.kept_indices(t.detach().cpu(), self.cfg.selection)
                for n, t in zip(self.names, self.theta)}

    def hard_ratios(self, kept: dict[str, list[int]]) -> dict[str, float]:
        return achieved(self.ctx, {n: len(k) for n, k in kept.items()})

    def expected_ratio(self) -> torch.Tensor:
        cost = 0.0
        for n, t in zip(self.names, self.theta):
            m, k = self.ctx.shapes[n]
            c = gates.expected_kept(t, self.cfg.selection) * (m + k)
            cost = cost + c - (c - m * k).clamp_min(0).detach()   # value min(c, mn), grad linear
        d, tot = self.ctx.dense_linear, self.ctx.total_params
        return cost / d if self.cfg.scope == "linear" else (tot - d + cost) / tot

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "phase": self.phase, "held": self.held,
                "names": self.names, "config": json.dumps(self.cfg.to_dict()),
                "theta": [t.detach().cpu() for t in self.theta], "opt": self.opt.state_dict()}

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        state = torch.load(path, weights_only=True, map_location=self.device)
        saved = json.loads(state["config"])
        diff = {k for k in saved if k not in _RESUME_FREE and saved[k] != self.cfg.to_dict()[k]}
        if state["names"] != self.names or diff:
            raise TrainingError(f"checkpoint {path!r} belongs to another run (differs in "
                                f"{sorted(diff) or 'layers'}); delete it or pick another file")
        with torch.no_grad():
            for t, s in zip(self.theta, state["theta"]):
                t.copy_(s)
        self.opt.load_state_dict(state["opt"])
        self.step, self.phase, self.held = state["step"], state["phase"], state["held"]

    # --- events -----------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        if self.cfg.log_path:
            with open(self.cfg.log_path, "a") as fh:
                fh.write(json.dumps(event) + "\n")
        if self.ctx.callback is not None:
            self.ctx.callback(event)

    def mask_event(self) -> dict:
        return {"type": "masks", "step": self.step,
                "probs": {n: torch.sigmoid(t.detach()).cpu().tolist()
                          for n, t in zip(self.names, self.theta)}}

    # --- training ---------------------------------------------------------------------------
    def _loss(self, layers, targets, ids_all, gen) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        idx = torch.randint(0, ids_all.shape[0], (cfg.batch_size,), generator=gen)
        ids = ids_all[idx]
        if cfg.train_seq_len:
            ids = ids[:, :cfg.train_seq_len]
        ids = ids.to(self.device)
        tv = 0.0
        for n, t in zip(self.names, self.theta):
            mask, _ = gates.gate(t, cfg.tau, gates.logistic_noise(t.shape, gen), cfg.selection)
            layers[n].mask = mask
            tv = tv + gates.total_variation(torch.sigmoid(t))    # of the expected mask
        auto = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.bf16 and self.device.type == "cuda" else nullcontext())
        with auto:
            if cfg.objective == "lm":
                logits = self.ctx.model(input_ids=ids).logits.float()
                fit = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            else:
                hs = distill.hidden_at(self.ctx.model, ids, self.layers)
                dist = distill.nmse if cfg.distill_loss == "nmse" else distill.mse
                fit = sum(dist(h, tg[idx.to(tg.device), :h.shape[1]].to(h.device))
                          for h, tg in zip(hs, targets)) / len(hs)
        comp = (self.expected_ratio() - cfg.ratio) / max(1.0 - cfg.ratio, 1e-3)
        return {"compression": comp, "fit": fit, "tv": tv / len(self.names)}

    def run(self) -> dict[str, list[int]]:
        """Train (or resume) until frozen, stopped or out of steps; returns kept indices."""
        cfg, ctx, model = self.cfg, self.ctx, self.ctx.model
        if cfg.checkpoint and os.path.exists(cfg.checkpoint):
            self.load(cfg.checkpoint)
        elif cfg.log_path:
            open(cfg.log_path, "w").close()   # a fresh run starts a fresh log
        self.layers = distill.distill_layers(model)
        ids_all = ctx.windows
        targets = []
        if cfg.objective == "distill":
            tgt_ids = ids_all[:, :cfg.train_seq_len] if cfg.train_seq_len else ids_all
            targets = distill.precompute_targets(model, tgt_ids, self.layers, cfg.batch_size)
        _, blocks = find_blocks(model)          # before the swap: blocks hold nn.Linear
        with ExitStack() as stack:
            # Frozen weights, eval mode, no KV cache; the model is restored on any exit.
            layers = stack.enter_context(
                masked_session(model, {n: ctx.factors[n] for n in self.names}))
            for layer in layers.values():
                layer.path = cfg.path
            if cfg.activation_checkpointing:
                originals = list(blocks)
                for i, b in enumerate(originals):
                    blocks[i] = _Checkpointed(b)
                stack.callback(lambda: [blocks.__setitem__(i, b) for i, b in enumerate(originals)])
            self._train(layers, targets, ids_all)
        return self.finalise(self.kept())

    def current_lr(self) -> float:
        """``lr`` while compressing; a cosine from ``lr`` to ``lr_final`` over the holding."""
        if self.phase == "compress":
            return self.cfg.lr
        frac = min(self.held / max(self.cfg.hold_steps, 1), 1.0)
        return self.cfg.lr_final + (self.cfg.lr - self.cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * frac))

    def _train(self, layers, targets, ids_all) -> None:
        cfg = self.cfg
        self.stopped = False
        while self.step < cfg.steps:
            if self.ctx.should_stop():
                self.stopped = True
                break
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            terms = self._loss(layers, targets, ids_all, gen)
            alpha = gates.cosine_alpha(self.step, cfg.alpha_period, cfg.alpha_low,
                                       cfg.alpha_high)
            on = 1.0 if self.phase == "compress" else 0.0
            loss = on * cfg.beta_c * terms["compression"] + alpha * terms["fit"] \
                + cfg.beta_tv * terms["tv"]
            if not torch.isfinite(loss):
                raise TrainingError(f"LLRC loss became {loss.item()} at step {self.step} "
                                    f"(fit {terms['fit'].item()}); lower lr (now {cfg.lr}), "
                                    "check the calibration text, or run in float32")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in self.opt.param_groups:
                group["lr"] = self.current_lr()
            self.opt.step()
            self.step += 1
            kept = self.kept()
            r = self.hard_ratios(kept)
            target_met = r[cfg.scope] <= cfg.ratio
            if self.phase == "compress" and target_met:
                # Momentum would carry the push past the target: start holding from rest.
                # ``held`` counts every step spent holding, across re-entries.
                self.phase = "hold"
                self.opt.state.clear()
            elif self.phase == "hold":
                if r[cfg.scope] > cfg.ratio + cfg.tolerance:
                    self.phase = "compress"
                else:
                    self.held += 1
            self.emit({"type": "step", "step": self.step, "loss": loss.item(),
                       "loss_compression": terms["compression"].item(),
                       "loss_distill": terms["fit"].item(), "loss_tv": float(terms["tv"].detach()),
                       "alpha": alpha, "tau": cfg.tau, "ratio_linear": r["linear"],
                       "ratio_model": r["model"], "target_ratio": cfg.ratio,
                       "phase": self.phase, "ranks": {n: len(k) for n, k in kept.items()},
                       "seconds": time.time() - self.t0})
            if cfg.mask_every and self.step % cfg.mask_every == 0:
                self.emit(self.mask_event())
            if cfg.checkpoint and self.step % cfg.checkpoint_every == 0:
                self.save(cfg.checkpoint)
            if self.phase == "hold" and self.held >= cfg.hold_steps:
                break
        if cfg.checkpoint:
            self.save(cfg.checkpoint)

    # --- final plan -------------------------------------------------------------------------
    def finalise(self, kept: dict[str, list[int]]) -> dict[str, list[int]]:
        """Move the kept sets onto the budget by logit order: drop the weakest open gates
        while over budget, then open the strongest closed ones while they fit."""
        shapes = self.ctx.shapes
        theta = {n: t.detach().cpu() for n, t in zip(self.names, self.theta)}
        ranked = {n: t.sort(descending=True).values for n, t in theta.items()}
        kept = {n: sorted(k) for n, k in kept.items()}
        top = self.cfg.selection == "top-k"
        cost = {n: layer_cost(*shapes[n], len(k)) for n, k in kept.items()}
        spent = sum(cost.values())

        def candidates(n, drop):   # (priority, index) of the next gate to drop / to open
            k, t = kept[n], theta[n]
            if top:   # a prefix as long as the open gates: the k-th largest logit decides
                i = len(k) - 1 if drop else len(k)
                return None if i < (1 if drop else 0) or i >= t.numel() else (ranked[n][i].item(), i)
            pool = k if drop else sorted(set(range(t.numel())) - set(k))
            if drop and len(k) <= 1 or not pool:
                return None
            i = min(pool, key=lambda j: t[j]) if drop else max(pool, key=lambda j: t[j])
            return t[i].item(), i

        for drop in (True, False):
            heap = []
            for n in self.names:
                c = candidates(n, drop)
                if c is not None:
                    heap.append((c[0] if drop else -c[0], n, c[1]))
            heapq.heapify(heap)
            while heap and (spent > self.budget if drop else True):
                _, n, i = heapq.heappop(heap)
                new = [j for j in kept[n] if j != i] if drop else sorted(kept[n] + [i])
                new_cost = layer_cost(*shapes[n], len(new))
                if not drop and spent - cost[n] + new_cost > self.budget:
                    continue
                kept[n], spent, cost[n] = new, spent - cost[n] + new_cost, new_cost
                c = candidates(n, drop)
                if c is not None:
                    heapq.heappush(heap, (c[0] if drop else -c[0], n, c[1]))
        return kept


@register_selector("llrc", LLRCConfig)
def select_llrc(ctx: SelectionContext, cfg: LLRCConfig):
    run = LLRCRun(ctx, cfg)
    kept = run.run()
    plan = ctx.plan(kept, "llrc", cfg, steps=run.step, stopped=run.stopped,
                    seconds=time.time() - run.t0)
    run.emit({"type": "done", "step": run.step, "stopped": run.stopped,
              "plan": plan.to_dict()})
    return plan
