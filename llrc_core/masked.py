"""Masked low-rank layers for learned rank selection (LLRC, ARS, ARA).

A ``MaskedLowRank`` holds a layer's frozen factors ``U (m x r)``, ``S (r)``, ``V (r x n)`` and
computes ``y = U diag(S * mask) V x + bias`` with a differentiable ``mask (r,)`` that the
trainer sets before each forward pass. Per call it takes the cheaper of

  (a) factorised:   ``U ((S * mask) * (V x))``  ~ ``T r (m + n)`` multiply-adds, and
  (b) materialised: ``W_m = (U * (S * mask)) V`` once (``m r n``), then ``x W_m^T``
      (``T m n``),

by comparing those counts for the call's token count ``T`` (forward and backward scale alike).
A plan's exact loss needs no gradient (``polish.py``'s checks): with ``keep_only`` a call
gathers the kept values' columns and costs the same with ``k`` kept values for ``r``.

Offloaded factors (``placement.Placement.offload_factors``) stay in CPU memory: each forward
moves the layer's ``U`` and ``V`` to the device, and a ``saved_tensors_hooks`` pair keeps
autograd from holding those copies until the backward pass: it saves a note of where they
came from and fetches them again when the backward needs them. (accelerate's offload hooks
move weights in for a forward and out after it, but autograd would still keep the moved
copies alive until the backward; recomputing whole blocks, as activation checkpointing
does, would run every block's forward twice.) Offloaded layers always take path (a):
path (b) would save an ``m x n`` matrix per layer for the backward.

Sharded factors (``Placement.shard_over``, under ``torchrun``) are frozen parameters instead
of buffers, so that FSDP2 splits them over the processes (``distributed.shard_``); inside the
forward pass they are whole, so the layer computes as it would unsharded.
"""
from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .apply import wrap_
from .decompose import Factors
from .models import weight_of
from .onload import onloaded


class MaskedLowRank(nn.Module):
    def __init__(self, factors: Factors, bias: torch.Tensor | None, dtype=None, device=None,
                 offloaded: bool = False, sharded: bool = False):
        super().__init__()
        self.offloaded, self.sharded, self.dtype = offloaded, sharded, dtype
        # In place: the stored factors are used as they are when dtype and device match.
        f = factors if offloaded else factors.to(device, dtype)
        for name, t in (("U", f.U), ("V", f.V)):                           # (m, r), (r, n)
            if sharded:                                 # FSDP2 shards parameters, not buffers
                self.register_parameter(name, nn.Parameter(t.contiguous(), requires_grad=False))
            else:
                self.register_buffer(name, t.contiguous(), persistent=False)
        self.register_buffer("S", f.S.to(device, dtype).contiguous(), persistent=False)  # (r,)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, dtype),
                             persistent=False)
        self.mask: torch.Tensor | None = None    # (r,) set by the trainer; None = all kept
        self.kept: torch.Tensor | None = None    # keep_only's indices
        self.path = "auto"                       # "auto", "factorised" or "dense"
        self.last_path = ""
        self.fetches = 0                         # offloaded: factor copies moved to the device

    @property
    def rank(self) -> int:
        return self.S.numel()

    def choose(self, tokens: int, r: int | None = None) -> str:
        if self.offloaded:
            return "factorised"
        if self.path != "auto":
            return self.path
        (m, full), n = self.U.shape, self.V.shape[1]
        r = full if r is None else r
        return "dense" if m * r * n + tokens * m * n < tokens * r * (m + n) else "factorised"

    def keep_only(self, idx) -> bool:
        """Compute with the singular values ``idx`` alone, without a mask or its gradient: a
        call gathers ``U[:, idx] diag(S[idx])`` and ``V[idx]`` (one layer's at a time, so
        nothing is held between calls: the memory planner's polish phase is unchanged) and
        costs what the full rank's would with ``len(idx)`` for ``r``. ``None`` clears it.
        Offloaded or sharded factors are whole only inside a forward pass, so there it does
        nothing and returns False (the caller masks instead)."""
        if idx is None or self.offloaded or self.sharded:
            self.kept = None
            return idx is None
        self.kept = torch.tensor(sorted(idx), dtype=torch.long, device=self.S.device)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x)
        # FSDP2 gathers a sharded layer's factors for its backward from a hook on the output;
        # an in-place op of the model on an output that is a view (linear's on 3-D input)
        # would drop that hook, so a sharded layer returns its own tensor.
        return y.clone() if self.sharded and y._is_view() else y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mask comes from the trainer's device (the first GPU when blocks are spread
        # over several): autograd carries its gradient back across the move.
        tokens = x.numel() // x.shape[-1]
        if self.kept is not None:                             # keep_only: (m, k), (k, n)
            Us, V = self.U[:, self.kept] * self.S[self.kept], self.V[self.kept]
            self.last_path = self.choose(tokens, V.shape[0])
            if self.last_path == "dense":
                return nn.functional.linear(x, Us @ V, self.bias)
            return nn.functional.linear(nn.functional.linear(x, V), Us, self.bias)
        s = self.S if self.mask is None else \
            self.S * self.mask.to(self.S.device, self.S.dtype)                   # (r,)
        self.last_path = self.choose(tokens)
        if self.offloaded:
            return self._offloaded(x, s)
        if self.last_path == "dense":
            W = (self.U * s) @ self.V                                     # (m, n)
            return nn.functional.linear(x, W, self.bias)
        h = nn.functional.linear(x, self.V) * s                          # (..., r)
        return nn.functional.linear(h, self.U, self.bias)                # (..., m)

    def _fetch(self, stored: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.fetches += 1
        return stored.to(device, self.dtype, non_blocking=True)

    def _offloaded(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Path (a) on factors fetched from CPU memory; autograd saves notes, not copies."""
        U, V = self._fetch(self.U, x.device), self._fetch(self.V, x.device)
        source = {U.untyped_storage().data_ptr(): self.U, V.untyped_storage().data_ptr(): self.V}

        def pack(t: torch.Tensor):        # a fetched factor (or a view of one): a note
            stored = source.get(t.untyped_storage().data_ptr()) if t.device == x.device \
                else None
            return t if stored is None else (stored, t.shape, t.stride(), t.storage_offset())

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            stored, shape, stride, offset = saved
            return self._fetch(stored, x.device).as_strided(shape, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            h = nn.functional.linear(x, V) * s                           # (..., r)
            return nn.functional.linear(h, U, self.bias)                 # (..., m)


def install_masked_(model: nn.Module, factors: dict[str, Factors], offloaded: bool = False,
                    sharded: bool = False) -> dict[str, MaskedLowRank]:
    """Swap every layer named in ``factors`` for a ``MaskedLowRank`` (``apply.restore_`` undoes
    it). Factors move to the layer's device and dtype, unless ``offloaded`` (they stay where
    they are stored and move per forward pass) or ``sharded`` (``placement.ShardedFactors``:
    each process keeps its rows on the layer's device, ``distributed.shard_``)."""
    layers = {}
    for name, f in factors.items():
        old = model.get_submodule(name)
        with onloaded(old):          # sequentially onloaded: the bias and the device it runs on
            w = weight_of(old)
            bias = getattr(old, "bias", None)
            if sharded:   # whole-size in CPU memory, this process's rows filled: FSDP2 keeps
                f = f.padded()      # exactly those rows, moved to w.device
            layer = MaskedLowRank(f, bias, w.dtype, f.U.device if sharded else w.device,
                                  offloaded, sharded)
            if sharded:
                distributed.shard_(layer, w.device)
        layers[name] = wrap_(model, name, layer)
    return layers
