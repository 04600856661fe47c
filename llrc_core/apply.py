"""Apply a rank plan to a model and undo it exactly.

Each compressed target becomes a ``LowRankLinear`` (two GEMMs, bias kept); a dense layer
(at or above break-even) keeps its original module. The originals are remembered on the
model so ``restore_`` puts back the very same modules. Functions ending in ``_`` change the
model in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decompose import Factors
from .models import weight_of
from .onload import offload_like_, onloaded
from .plan import RankPlan

_ORIGINALS = "_llrc_originals"
_PARKED = "_llrc_parked"


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias`` with ``B (k x n)`` then ``A (m x k)``; drop-in for a linear layer.

    Same state-dict layout and forward as the export loader's layer
    (``hf_remote.modeling_llrc.LowRankLinear``, which must stay self-contained; importing it
    here would import transformers): one ``F.linear`` chain on the parameters, no submodule
    calls, the bias added inside the second GEMM. ``from_factors`` stores the factors
    contiguous in the dtype and device of ``A``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 kept: list[int] | None = None, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.kept = list(range(rank)) if kept is None else list(kept)  # singular indices kept
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     kept: list[int] | None = None) -> "LowRankLinear":
        m, k = A.shape
        layer = cls(B.shape[1], m, k, bias is not None, kept, A.dtype, A.device)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.A.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.B.weight)                       # (..., n) -> (..., k)
        return F.linear(h, self.A.weight, self.A.bias)       # (..., k) -> (..., m)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def swap_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name``; return the old one."""
    old = model.get_submodule(name)
    model.set_submodule(name, new)
    return old


def low_rank_from(module: nn.Module, factors: Factors, kept: list[int]) -> LowRankLinear:
    """A ``LowRankLinear`` in the module's dtype and device keeping indices ``kept``."""
    w = weight_of(module)
    A, B = factors.factors(kept)
    A, B = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
    bias = getattr(module, "bias", None)
    return LowRankLinear.from_factors(A, B, None if bias is None else bias.detach(), kept)


def _registry(model: nn.Module, attr: str) -> dict:
    if not hasattr(model, attr):
        object.__setattr__(model, attr, {})  # plain attribute, not a submodule
    return getattr(model, attr)


def originals_of(model: nn.Module) -> dict[str, nn.Module]:
    """The registry of original modules swapped out (shared by every wrapper kind)."""
    return _registry(model, _ORIGINALS)


def park_(model: nn.Module, names) -> None:
    """Move the swapped-out originals of ``names`` that sit on a GPU into CPU memory; putting
    an original back (``restore_``, re-applying a plan) returns it to its device first."""
    parked = _registry(model, _PARKED)
    for name in names:
        old = originals_of(model)[name]
        device = weight_of(old).device
        if device.type not in ("cpu", "meta"):      # meta: sequentially onloaded, in CPU memory
            parked[name] = device
            old.to("cpu")                                   # Module.to: in place


def _put_back(model: nn.Module, name: str, old: nn.Module) -> None:
    """Swap the original ``old`` back in as ``name``, on its own device if it was parked."""
    device = _registry(model, _PARKED).pop(name, None)
    if device is not None:
        old.to(device)
    swap_module_(model, name, old)


def wrap_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap ``name`` for ``new``, remembering the original module once."""
    originals = originals_of(model)
    old = swap_module_(model, name, new)
    originals.setdefault(name, old)
    return new


def apply_plan_(model: nn.Module, plan: RankPlan, factors: dict[str, Factors],
                release: bool = False) -> nn.Module:
    """Swap every non-dense planned layer for its low-rank form; remembers the originals.
    ``release`` (a one-shot run): pop each layer's factors from ``factors`` once its
    low-rank form is made, and park its original (``park_``), so that a layer holds one of
    its forms on the device."""
    originals = originals_of(model)
    missing = [n for n, lp in plan.layers.items() if not lp.dense and n not in factors]
    if missing:
        raise ValueError(f"no factors for planned layers {missing[:3]}...; decompose them first")
    for name, lp in plan.layers.items():
        if name in originals:
            _put_back(model, name, originals.pop(name))      # re-applying: start from dense
        if lp.dense:
            if release:
                factors.pop(name, None)
            continue
        old = model.get_submodule(name)
        m, n = weight_of(old).shape
        if (m, n) != (lp.m, lp.n):
            raise ValueError(f"{name}: plan shape {(lp.m, lp.n)} != layer shape {(m, n)}")
        # An onloaded original is read where its weights wait (CPU memory) and its low-rank
        # form waits there too, offloaded alike (``onload.py``).
        with onloaded(old, "cpu"):
            new = low_rank_from(old, factors[name], lp.kept)
        swap_module_(model, name, offload_like_(new, old))
        originals[name] = old
        if release:
            del factors[name]
            park_(model, [name])
    return model


def restore_(model: nn.Module) -> nn.Module:
    """Put every original module back (a parked one on its own device first); the model is
    exactly as before ``apply_plan_``."""
    originals = originals_of(model)
    for name, old in originals.items():
        _put_back(model, name, old)
    originals.clear()
    return model
