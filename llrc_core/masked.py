"""Masked low-rank layers for learned rank selection (LLRC, ARS, ARA).

A ``MaskedLowRank`` holds a layer's frozen factors ``U (m x r)``, ``S (r)``, ``V (r x n)`` and
computes ``y = U diag(S * mask) V x + bias`` with a differentiable ``mask (r,)`` that the
trainer sets before each forward pass. Per call it takes the cheaper of

  (a) factorised:   ``U ((S * mask) * (V x))``  ~ ``T r (m + n)`` multiply-adds, and
  (b) materialised: ``W_m = (U * (S * mask)) V`` once (``m r n``), then ``x W_m^T``
      (``T m n``),

by comparing those counts for the call's token count ``T`` (forward and backward scale alike).
"""
from __future__ import annotations

import torch
from torch import nn

from .apply import wrap_
from .decompose import Factors
from .models import weight_of


class MaskedLowRank(nn.Module):
    def __init__(self, factors: Factors, bias: torch.Tensor | None, dtype=None, device=None):
        super().__init__()
        f = factors.to(device, dtype)
        self.register_buffer("U", f.U.contiguous(), persistent=False)       # (m, r)
        self.register_buffer("S", f.S.contiguous(), persistent=False)       # (r,)
        self.register_buffer("V", f.V.contiguous(), persistent=False)       # (r, n)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, dtype),
                             persistent=False)
        self.mask: torch.Tensor | None = None    # (r,) set by the trainer; None = all kept
        self.path = "auto"                       # "auto", "factorised" or "dense"
        self.last_path = ""

    @property
    def rank(self) -> int:
        return self.S.numel()

    def choose(self, tokens: int) -> str:
        if self.path != "auto":
            return self.path
        (m, r), n = self.U.shape, self.V.shape[1]
        return "dense" if m * r * n + tokens * m * n < tokens * r * (m + n) else "factorised"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.S if self.mask is None else self.S * self.mask.to(self.S.dtype)   # (r,)
        tokens = x.numel() // x.shape[-1]
        self.last_path = self.choose(tokens)
        if self.last_path == "dense":
            W = (self.U * s) @ self.V                                     # (m, n)
            return nn.functional.linear(x, W, self.bias)
        h = nn.functional.linear(x, self.V) * s                          # (..., r)
        return nn.functional.linear(h, self.U, self.bias)                # (..., m)


def install_masked_(model: nn.Module, factors: dict[str, Factors]) -> dict[str, MaskedLowRank]:
    """Swap every layer named in ``factors`` for a ``MaskedLowRank`` (``apply.restore_`` undoes
    it). Factors move to the layer's device and dtype."""
    layers = {}
    for name, f in factors.items():
        old = model.get_submodule(name)
        w = weight_of(old)
        bias = getattr(old, "bias", None)
        layers[name] = wrap_(model, name, MaskedLowRank(f, bias, w.dtype, w.device))
    return layers
