"""Learned masks over singular values: pure maths, tensors in and tensors out.

* Gumbel-Sigmoid gate ``y = sigmoid((theta + g) / tau)``, ``g`` logistic noise; the forward
  pass uses the hard gate ``y > 0.5`` with straight-through gradients (``hard - sg(y) + y``).
  ``P(gate open) = sigmoid(theta)`` exactly, since ``theta + g > 0`` has that probability.
* **any-k**: every singular value has its own gate.
* **top-k**: the mask keeps a prefix as long as the number of open gates (monotone in the
  index; the gradient reaches every gate through the count). A cumulative product of the
  gates was tried first: one noisy early gate then cut the whole tail and training collapsed.
"""
from __future__ import annotations

import math

import torch


def init_logits(r: int, high: float = 6.0, low: float = 3.0) -> torch.Tensor:
    """One logit per singular value, descending with the index: ``linspace(high, low, r)``."""
    return torch.linspace(high, low, r)


def init_at(r: int, k: int, level: float = 3.0) -> torch.Tensor:
    """Logits that open the first ``k`` of ``r`` gates: ``+level`` then ``-level``."""
    return torch.where(torch.arange(r) < k, level, -level).float()


def logistic_noise(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, noise: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, soft)``, elementwise on any shape: ``soft = sigmoid((logits + noise) / tau)``
    and the straight-through mask, hard ``soft > 0.5`` in value with ``soft``'s gradient.
    ``noise=None``: the deterministic gate ``logits > 0``."""
    z = logits if noise is None else logits + noise.to(logits.device, logits.dtype)
    soft = torch.sigmoid(z / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft, soft


def gate(theta: torch.Tensor, tau: float, noise: torch.Tensor | None, selection: str
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, soft)``: the straight-through hard mask and the soft sample, both (r,).

    ``noise=None`` gives the deterministic gate ``theta > 0`` (used to read off the plan).
    """
    mask, soft = gumbel_sigmoid(theta, tau, noise)                  # (r,) each
    if selection == "top-k":
        hard = (soft > 0.5).to(soft.dtype)
        # Keep the prefix as long as the number of open gates; its soft edge
        # sigmoid(k_soft - i - 1/2) passes the gradient to every gate through the count.
        i = torch.arange(theta.numel(), device=theta.device, dtype=soft.dtype)
        soft_prefix = torch.sigmoid(soft.sum() - i - 0.5)
        hard_prefix = (i < hard.sum()).to(soft.dtype)
        return hard_prefix - soft_prefix.detach() + soft_prefix, soft
    return mask, soft                                                # value hard, grad soft


def dense_switch(mask: torch.Tensor, break_even: int) -> torch.Tensor:
    """The layer as the plan will store it: once ``mask`` keeps ``break_even`` values or more
    the layer is dense, so every value is kept (value 1 everywhere); the gradient is the
    mask's own, so the gates can still close (ARA's switch, ``selectors/ara.py``)."""
    if mask.detach().sum() < break_even:
        return mask
    return mask + (1 - mask).detach()


def expected_kept(theta: torch.Tensor, selection: str) -> torch.Tensor:
    """Expected number of kept singular values (differentiable); the same in both modes,
    since top-k keeps as many as there are open gates."""
    return torch.sigmoid(theta).sum()


def kept_indices(theta: torch.Tensor, selection: str) -> list[int]:
    """Indices the deterministic gates keep (never empty: the top logit is kept)."""
    open_ = theta > 0
    if selection == "top-k":
        idx = list(range(max(int(open_.sum()), 1)))
    else:
        idx = open_.nonzero().flatten().tolist()
    return idx or [int(theta.argmax())]


def total_variation(y: torch.Tensor) -> torch.Tensor:
    """``sum_i |y_{i+1} - y_i|`` along the singular index, per unit length."""
    return (y[1:] - y[:-1]).abs().sum() / max(y.numel() - 1, 1)


def transitions(idx: list[int], r: int) -> int:
    """Number of 0/1 changes along a mask of length ``r`` keeping ``idx``."""
    m = torch.zeros(r, dtype=torch.int8)
    m[idx] = 1
    return int((m[1:] != m[:-1]).sum())


def cosine_alpha(step: int, period: int, low: float, high: float) -> float:
    """Cyclical weight: ``high`` at the start of each period, ``low`` half-way."""
    if period <= 0:
        return high
    return low + (high - low) * 0.5 * (1 + math.cos(2 * math.pi * (step % period) / period))


def kept_by_score(scores: dict[str, torch.Tensor], counts: dict[str, int],
                  selection: str) -> dict[str, list[int]]:
    """Kept indices of ``counts[name]`` values per layer: the prefix (top-k), or the values
    with the highest scores (any-k; ties by index)."""
    if selection == "top-k":
        return {n: list(range(k)) for n, k in counts.items()}
    return {n: sorted(torch.argsort(scores[n], descending=True, stable=True)[:k].tolist())
            for n, k in counts.items()}
