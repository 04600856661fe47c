"""The training objective of the learned selectors, and the order their batches come in.

``Objective``: the next-token loss, or the distance between the masked model's hidden states
and the original's (distillation: encoders, and LLRC on any model), on a batch of
calibration windows given as indices. ``batch_indices`` / ``EpochBatches`` give seeded
epochs of shuffled windows, ``step_generator`` a generator seeded per step, so every run is
reproducible and a resumed one draws what an unbroken one would (``learned.train_masks``).

Data parallel (``torchrun``): each rank computes the objective on its share of every global
batch, weighted so that the rank-averaged gradient is the whole batch's. The next-token and
``mse`` / ``scaled`` distances split exactly over ranks; ``nmse`` normalises per rank's share.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator

import torch
from torch import nn

from .. import distributed, distill, losses
from ..threads import one_thread

OBJECTIVES = ("auto", "lm", "distill")       # what resolve_objective takes


def resolve_objective(model: nn.Module, objective: str) -> str:
    """``auto``: next-token loss when the model has an LM head, else distillation (encoders)."""
    has_head = distill.has_lm_head(model)
    if objective == "auto":
        return "lm" if has_head else "distill"
    if objective == "lm" and not has_head:
        raise ValueError(f"objective 'lm' needs a model with an LM head; {type(model).__name__} "
                         "has none: use objective='distill' (or 'auto')")
    return objective


class Objective:
    """Training loss on a batch of calibration windows, given as indices into ``windows``.

    ``lm``: mean next-token cross-entropy. ``distill``: distance between the masked model's
    hidden states at ``layers`` (``output_hidden_states`` indices; default: the last) and the
    original model's, averaged over the layers. The targets are computed once, here, from the
    model as it is (build the objective before installing masks). ``distance``: ``nmse``
    (per batch), ``mse``, ``scaled`` (MSE divided by the targets' mean square over all
    windows: scale-free), ``pooled[:SPAN]``, or ``kl`` (the last state through the output
    head, ``KL(original || masked)`` of the next-token distributions; any earlier state by
    ``nmse``: the teacher's logits are made from the stored last state each step, so no
    ``N x T x V`` array is kept). ``seq_len`` keeps the first tokens of each window (0: all).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, kind: str = "auto",
                 batch_size: int = 8, *, layers: tuple[int, ...] | None = None,
                 distance: str = "scaled", seq_len: int = 0, bf16: bool = False,
                 targets_device: torch.device | None = None):
        self.model, self.kind = model, resolve_objective(model, kind)
        self.device = next(model.parameters()).device
        self.windows = windows[:, :seq_len] if seq_len else windows             # (n, L)
        self.bf16 = bf16 and self.device.type == "cuda"
        self.distance = distance
        if self.kind == "distill":
            self.layers = layers or distill.distill_layers(model)[1:]
            self.targets = distill.precompute_targets(model, self.windows, self.layers,
                                                      batch_size, targets_device)  # (n, L, d)
            with one_thread():      # a full-tensor sum splits by thread count: see __call__
                self.scales = [t.float().pow(2).mean().clamp_min(1e-12).item()
                               for t in self.targets]
            self.head = distill.output_head(model) if distance == "kl" else None
            if distance == "kl" and self.head is None:
                raise ValueError("distill_loss 'kl' compares next-token distributions and "
                                 "needs a model with an LM head; use nmse or pooled for an "
                                 "encoder")

    def _distance(self, h: torch.Tensor, t: torch.Tensor, scale: float,
                  last: bool) -> torch.Tensor:
        if self.distance == "kl":                     # the last: logits, through the head
            return losses.kl_logits(h, t) if last else losses.nmse(h, t)
        if self.distance == "nmse":
            return losses.nmse(h, t)
        if self.distance.startswith("pooled"):                    # "pooled" or "pooled:SPAN"
            return losses.pooled_cosine(h, t, int(self.distance.partition(":")[2] or 32))
        return losses.mse(h, t) / (scale if self.distance == "scaled" else 1.0)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """The loss on windows ``idx``; in a process group, on this rank's share of them,
        weighted so that the rank-averaged gradient is the whole batch's (``distributed``)."""
        weight, idx = distributed.share(idx), distributed.local(idx)
        ids = self.windows[idx].to(self.device)                                   # (B, L)
        auto = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with auto:
            if self.kind == "lm":
                loss = losses.next_token_loss(self.model(input_ids=ids).logits, ids)
            else:
                hs = distill.hidden_at(self.model, ids, self.layers)              # (B, L, d) each
                ts = [t[idx.to(t.device), :h.shape[1]].to(h.device)
                      for h, t in zip(hs, self.targets)]
                if self.head is not None:     # kl: the head's matmul on every thread
                    with torch.no_grad():
                        ts[-1] = self.head(ts[-1].to(hs[-1].dtype))
                    hs[-1] = self.head(hs[-1])
                # The distances' sums over whole tensors split by thread: on one thread a
                # step's bits do not depend on the count (threads.py; the rest of a step's
                # forward and backward does not, measured). They are cheap.
                # Each distance is made where its state is (blocks spread over GPUs) and
                # summed on the objective's device.
                with one_thread():
                    loss = sum(self._distance(h, t, s, i == len(hs) - 1).to(self.device)
                               for i, (h, t, s) in enumerate(zip(hs, ts, self.scales))
                               ) / len(hs)
        return loss * weight if weight != 1.0 else loss


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of shuffled window indices, ``batch_size`` at a time."""
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield perm[i:i + b]


class EpochBatches:
    """``batch_indices`` that count what they drew, so a resumed run replays the order."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self._it, self.drawn = batch_indices(n, batch_size, seed), 0

    def __next__(self) -> torch.Tensor:
        self.drawn += 1
        return next(self._it)

    def skip_to(self, drawn: int) -> None:
        while self.drawn < drawn:
            next(self)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, step): a resumed run draws what an unbroken one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
