"""Where a compression run keeps what it holds besides the model: the memory-lean data path.

Full-rank factors are the largest thing a run holds: ``min(m, n) (m + n)`` numbers per layer,
about 1.6 x the weights for a Llama-2 block. A ``Placement`` says

* ``factor_dtype``: the dtype factors are stored in, once, as each layer is decomposed (the
  SVD itself runs in float32/float64). Default: the model's dtype on a GPU (masked layers then
  use the stored factors without a copy), float32 on a CPU.
* ``offload_factors``: factors wait in CPU memory (pinned when CUDA is there) and each masked
  layer moves its own to the device for its forward pass; the copies its backward needs are
  fetched again then instead of being kept (``masked.MaskedLowRank``). Device memory then
  holds one layer's factors at a time instead of all of them.
* ``offload_targets``: distillation targets (hidden states of the dense model over the
  calibration windows) in CPU memory, moved per batch.
* ``park_dense``: on a GPU, the dense originals of the swapped layers wait in CPU memory while
  masks train and come back when the session ends (normally, on error or on stop).
* ``offload_weights``: sequential onloading (``onload.py``): the model's blocks wait in CPU
  memory and each layer visits the device for its forward pass; the device holds the
  embeddings, the LM head and one layer's weights at a time (implies both offloads above).
* ``shard_over``: under ``torchrun`` with N processes (one GPU each), factors are made in
  CPU memory and, while masks train, each masked layer's ``U`` and ``V`` are split over the N
  processes with FSDP2 (``distributed.shard_``): each GPU holds 1/N of every layer's factors
  and gathers one layer's whole factors for its forward pass and again for its backward
  (over NVLink, not PCIe as offloaded factors). It replaces ``offload_factors``, also
  under sequential onloading (``offload_weights``: the dense blocks onloaded in turn, the
  factors sharded).

The planner (``planner.plan_memory``) counts each placement and picks the least offload
that fits; ``compress`` runs with the one it picked.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

from . import distributed
from .decompose import Factors
from .models import DTYPES

OFFLOADS = ("none", "targets", "factors", "weights")   # each level includes the ones before
SHARDABLE = ("none", "targets", "weights")   # sharded factors replace offloaded ones


@dataclass(frozen=True)
class Placement:
    factor_dtype: torch.dtype = torch.float32
    offload_factors: bool = False
    offload_targets: bool = False
    park_dense: bool = False
    offload_weights: bool = False
    shard_over: int = 1                  # processes the masked layers' factors are split over

    @classmethod
    def for_run(cls, model_dtype: torch.dtype, device: torch.device | str, offload: str = "none",
                factor_dtype: str | None = None, shard_over: int = 1) -> "Placement":
        """The placement of a run on ``device`` (``offload``: one of ``OFFLOADS``;
        ``factor_dtype``: a ``models.DTYPES`` name, ``None``/``"auto"`` for the default;
        ``shard_over``: processes to split the factors over while masks train, 1: none)."""
        if offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
        if shard_over > 1 and offload not in SHARDABLE:
            raise ValueError(f"sharded factors (--shard-factors) replace --offload {offload}: "
                             f"use --offload {' or '.join(SHARDABLE)} with them, or drop "
                             "--shard-factors")
        on_gpu = torch.device(device).type == "cuda"
        if factor_dtype in (None, "auto"):
            dtype = model_dtype if on_gpu else torch.float32
        elif factor_dtype in DTYPES:
            dtype = DTYPES[factor_dtype]
        else:
            raise ValueError(f"factor dtype must be 'auto' or one of {sorted(DTYPES)}, got "
                             f"{factor_dtype!r}")
        level = OFFLOADS.index(offload)
        return cls(dtype, offload_factors=level >= 2 and shard_over <= 1,
                   offload_targets=level >= 1, park_dense=on_gpu, offload_weights=level >= 3,
                   shard_over=max(shard_over, 1))

    @property
    def sharded(self) -> bool:
        return self.shard_over > 1

    @property
    def offload(self) -> str:
        return "weights" if self.offload_weights else "factors" if self.offload_factors \
            else "targets" if self.offload_targets else "none"

    def store(self, f: Factors, device: torch.device) -> Factors:
        """``f`` as the run keeps it: ``U`` and ``V`` in ``factor_dtype`` on ``device`` (CPU
        memory when offloaded, pinned, or sharded), the spectrum ``S`` in float32 (selectors
        rank by it)."""
        where = torch.device("cpu") if self.offload_factors or self.sharded else device
        U, V = f.U.to(where, self.factor_dtype), f.V.to(where, self.factor_dtype)
        if self.sharded:     # only this process's rows wait: 1/N of the factors per process
            return ShardedFactors(distributed.my_rows(U), f.S.to(where, torch.float32),
                                  distributed.my_rows(V), f.damping, m=U.shape[0], n=V.shape[1])
        if self.offload_factors and torch.cuda.is_available():
            U, V = U.pin_memory(), V.pin_memory()
        return Factors(U.contiguous(), f.S.to(where, torch.float32), V.contiguous(), f.damping)

    def stored_bytes(self, factor_numbers: int, spectrum_numbers: int) -> int:
        """Bytes of factors as ``store`` keeps them (in one process): ``U``, ``V`` in
        ``factor_dtype`` (sharded: this process's share), ``S`` in float32."""
        return -(-self.factor_dtype.itemsize * factor_numbers // self.shard_over) + \
            4 * spectrum_numbers

    def to_dict(self) -> dict:
        return {"factor_dtype": str(self.factor_dtype).removeprefix("torch."),
                "offload": self.offload, "park_dense": self.park_dense,
                "shard_factors_over": self.shard_over}


@dataclass
class ShardedFactors(Factors):
    """One process's rows of a layer's ``U`` (``m x r``) and ``V`` (``r x n``), split over
    the processes as FSDP2 splits them (``distributed.row_range``), with the whole spectrum
    ``S`` (selectors rank by it). ``padded`` gives a whole-size pair holding only these rows,
    for FSDP2 to take this process's chunk from; ``whole`` gathers every process's rows."""
    m: int = 0
    n: int = 0

    def padded(self) -> Factors:
        def fill(piece: torch.Tensor, rows: int) -> torch.Tensor:
            full = piece.new_zeros((rows, *piece.shape[1:]))
            full[distributed.row_range(rows)] = piece
            return full
        return Factors(fill(self.U, self.m), self.S, fill(self.V, self.rank), self.damping)

    def whole(self) -> Factors:
        """The layer's factors, gathered from every process (collective: every process
        calls it for the same layers in the same order)."""
        return Factors(distributed.all_rows(self.U, self.m), self.S,
                       distributed.all_rows(self.V, self.rank), self.damping)


class WholeOnRead(MutableMapping):
    """``factors`` (a dict of ``ShardedFactors``) read whole: each read gathers one layer
    (``ShardedFactors.whole``), so applying a plan holds one layer's whole factors at a time;
    removing a layer removes it from ``factors``."""

    def __init__(self, factors: dict):
        self.factors = factors

    def __getitem__(self, name: str) -> Factors:
        f = self.factors[name]
        return f.whole() if isinstance(f, ShardedFactors) else f

    def __setitem__(self, name: str, f: Factors) -> None:
        self.factors[name] = f

    def __delitem__(self, name: str) -> None:
        del self.factors[name]

    def __iter__(self):
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def pop(self, name: str, *default):    # without gathering what is dropped
        return self.factors.pop(name, *default)
