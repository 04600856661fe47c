"""Plumbing shared by the learned selectors (LLRC, ARS, ARA): a masked-model session that always
restores the model, the training objective, seeded batches, progress events and the
achieved ratio of a set of kept counts.

Orchestration only: the selectors own their maths (masks, regularisers, finalisation).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..apply import originals_of, restore_
from .. import distill
from ..counting import layer_cost, ratios
from ..masked import MaskedLowRank, install_masked_
from .base import SelectionContext

OBJECTIVES = ("auto", "lm", "distill")


def check_fields(cfg, positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = ()) -> None:
    """``ValueError`` naming the first config field out of range (config validation)."""
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
    for name in nonneg:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if getattr(cfg, "objective", "auto") not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")


def check_context(ctx: SelectionContext, method: str) -> None:
    if ctx.model is None or ctx.windows is None:
        raise ValueError(f"{method} trains on the model: it needs the model and calibration "
                         "windows (pass --calib / windows to select_plan)")
    missing = [n for n in ctx.shapes if n not in ctx.factors]
    if missing:
        raise ValueError(f"{method} needs the factors of every target layer; missing "
                         f"{missing[:3]}: decompose the model first")


@contextmanager
def masked_session(model: nn.Module, factors: dict) -> Iterator[dict[str, MaskedLowRank]]:
    """Swap the targets for ``MaskedLowRank`` layers, freeze every model parameter, switch
    dropout and the KV cache off; on exit (normal, error or stop) put everything back."""
    if originals_of(model):
        raise ValueError("the model already has swapped layers (a plan is applied); call "
                         "llrc_core.apply.restore_(model) before selecting a new plan")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()                       # no dropout: the mask is the only noise
        if use_cache is not None:
            cfg.use_cache = False
        yield install_masked_(model, factors)
    finally:
        restore_(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if use_cache is not None:
            cfg.use_cache = use_cache


def resolve_objective(model: nn.Module, objective: str) -> str:
    """``auto``: next-token loss when the model has an LM head, else distillation (encoders)."""
    has_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    if objective == "auto":
        return "lm" if has_head else "distill"
    if objective == "lm" and not has_head:
        raise ValueError(f"objective 'lm' needs a model with an LM head; {type(model).__name__} "
                         "has none: use objective='distill' (or 'auto')")
    return objective


class Objective:
    """Training loss on a batch of calibration windows.

    ``lm``: mean next-token cross-entropy. ``distill``: MSE between the compressed and the
    original last hidden states (``distill.hidden_at``: the model's base, no LM head),
    divided by the targets' mean square over all windows (so it is scale-free); the targets
    are computed once, here, from the model as it is (call before installing masks).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, kind: str,
                 batch_size: int = 8):
        self.model, self.kind = model, resolve_objective(model, kind)
        self.device = next(model.parameters()).device
        self.windows = windows
        self.targets = None
        if self.kind == "distill":
            self.layer = distill.distill_layers(model)[1:]          # the last layer
            self.targets = distill.precompute_targets(
                model, windows, self.layer, batch_size)[0].float().cpu()   # (n, L, d)
            self.scale = self.targets.pow(2).mean().clamp_min(1e-12).item()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        ids = self.windows[idx].to(self.device)                     # (B, L)
        if self.kind == "lm":
            logits = self.model(input_ids=ids).logits.float()       # (B, L, V)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   ids[:, 1:].reshape(-1))
        h = distill.hidden_at(self.model, ids, self.layer)[0].float()   # (B, L, d)
        return F.mse_loss(h, self.targets[idx].to(h.device)) / self.scale


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of shuffled window indices, ``batch_size`` at a time."""
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield perm[i:i + b]


def achieved(ctx: SelectionContext, counts: dict[str, int]) -> dict[str, float]:
    """Ratios in both scopes of keeping ``counts[name]`` singular values per layer
    (break-even rule included)."""
    cost = sum(layer_cost(*ctx.shapes[n], max(1, k)) for n, k in counts.items())
    return ratios(cost, ctx.dense_linear, ctx.total_params)


def other_params(ctx: SelectionContext) -> int:
    """Parameters that are never decomposed (embeddings, norms, biases, head)."""
    return ctx.total_params - ctx.dense_linear


def emit(ctx: SelectionContext, event: dict) -> None:
    if ctx.callback is not None:
        ctx.callback(event)


@contextmanager
def one_thread():
    """Run tiny sequential ops (a GRU over a few dozen steps) on one intra-op thread: with
    more, each time step pays a thread barrier, which costs 100x on a busy CPU (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0
