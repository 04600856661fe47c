"""Per-layer input statistics for the data-aware decompositions, collected with hooks.

* ``abs_sum``: sum over calibration tokens of ``|x_j|`` per input channel (ASVD's scaling;
  a sum is fine because the scaling is scale-free).
* ``gram``: ``sum over tokens x x^T`` (n x n), accumulated in float64 (whitening). Each
  batch's product runs in the activation dtype promoted to float32, then adds to the float64
  total: exact enough for calibration sums, and fast on CPU and GPU.

Collection runs block by block (``blocks.py``), so only one block's statistics and one set of
hidden states are alive at a time when ``on_block`` consumes them. Layers fed the same
tensor (q, k, v; a Llama MLP's gate and up) share one ``LayerStats``: one Gram computed,
stored and, in a process group, summed, where one per layer held 7 Grams per Llama block
instead of 4 (1.77 against 1.37 GB for Llama-2-7B, 9.8 against 8.2 GB for 70B).

In a process group (``torchrun``) every process forwards its own contiguous share of the
windows and each block's sums are all-reduced before ``on_block`` sees them: N processes
share the statistics pass, and every process ends with the sums over all windows (one
process's sums up to rounding: the batches are cut differently).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed
from .blocks import capture_block_inputs, inference_mode, run_block
from .models import Target, find_blocks, find_targets, skeleton_of

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    abs_sum: torch.Tensor | None   # (n,) float64
    gram: torch.Tensor | None      # (n, n) float64
    tokens: int

    def clone(self) -> "LayerStats":
        return LayerStats(*(None if t is None else t.clone() for t in (self.abs_sum, self.gram)),
                          self.tokens)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def degenerate(self) -> bool:
        """The layer's input was zero on every calibration token (or no token reached it):
        its statistics say nothing, and data-aware decompositions cannot use them."""
        seen = self.abs_sum if self.abs_sum is not None else self.gram.diagonal()
        return self.tokens == 0 or not bool((seen > 0).any())


class _Accumulator:
    """Owns the hooks of one block's target layers; always removed on exit. ``share``: a
    layer fed the tensor the layer before it was fed shares that layer's statistics object
    (otherwise it gets its own copy of the same sums). ``consistent`` turns False if a
    layer's sharing changes between batches (a model that calls a layer on varying inputs):
    the block is then collected again without sharing (``collect_stats``)."""

    def __init__(self, modules: dict[str, nn.Module], gram: bool, absmean: bool,
                 share: bool = True):
        self.gram, self.absmean, self.share = gram, absmean, share
        self.stats: dict[str, LayerStats] = {}
        self.owner: dict[str, str] = {}   # layer -> the layer whose statistics it shares
        self.consistent = True
        self._memo: dict = {}
        self._handles = [mod.register_forward_pre_hook(self._hook(name))
                         for name, mod in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach()
            prev = self._memo.get("x")
            # The previous input is held, so its memory cannot be reused by another tensor:
            # equal pointer and shape means the very same activation (q, k, v).
            fresh = prev is None or prev.data_ptr() != x.data_ptr() or prev.shape != x.shape
            if fresh:
                flat = x.reshape(-1, x.shape[-1]).float()  # (T, n)
                self._memo = {"x": x, "owner": name, "val": (
                    flat.abs().sum(0).double() if self.absmean else None,
                    (flat.T @ flat).double() if self.gram else None, flat.shape[0])}
            owner = self._memo["owner"] if self.share else name
            if self.owner.setdefault(name, owner) != owner:
                self.consistent = False
            if owner != name:                   # its owner's sums already hold this input
                self.stats.setdefault(name, self.stats[owner])
                return
            a, g, t = self._memo["val"]
            s = self.stats.get(name)
            if s is None:                       # a sum seen before belongs to another layer
                s = LayerStats(a, g, t)
                self.stats[name] = s if fresh else s.clone()
                return
            if g is not None:
                s.gram += g
            if a is not None:
                s.abs_sum += a
            s.tokens += t
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._memo = {}

    def summed(self, widths: dict[str, int]) -> dict[str, LayerStats]:
        """The block's statistics summed over the processes of a group (collective), as they
        are outside one. ``widths``: every hooked layer's input size, so that a layer no
        token of this process reached still takes part (with zero sums). Shared statistics
        are summed once where every process shares alike (``distributed.agreed``), else
        each layer is given its own copy and summed alone."""
        if not distributed.active():
            return self.stats
        owner = {n: self.owner.get(n, n) for n in sorted(widths)}
        alike = distributed.agreed(owner)
        if not alike:                     # each its own copy, made before any is summed
            for name in [n for n, o in owner.items() if o != n]:
                self.stats[name] = self.stats[name].clone()
        for name in sorted(widths):
            if alike and owner[name] != name:
                continue                                 # summed with its owner's
            s = self.stats.get(name)
            if s is None:                                # summed with the others' below
                n, dev = widths[name], distributed.comm_device()
                s = self.stats[name] = LayerStats(
                    torch.zeros(n, dtype=torch.float64, device=dev) if self.absmean else None,
                    torch.zeros(n, n, dtype=torch.float64, device=dev) if self.gram else None, 0)
            s.tokens = int(distributed.sum_([t for t in (s.abs_sum, s.gram) if t is not None],
                                            s.tokens))
        return self.stats


def shared_inputs(model: nn.Module) -> list[list[str]]:
    """Kinds of target (``Target.kind``) whose statistics one block shares at run time: the
    first block run on the meta device (nothing is computed or held; a loaded model, as the
    studio passes to the planner, is rebuilt there from its config, so its weights never
    run here) over 8 tokens, with the ``_Accumulator`` rule: a layer fed the tensor the
    layer before it was fed (the same object: never more sharing than the run finds) shares
    that layer's owner. ``[]`` when the meta device cannot run the model: none assumed."""
    meta = model
    if any(p.device.type != "meta" for p in model.parameters()):
        meta = skeleton_of(model.config)
    _, blocks = find_blocks(meta)
    first = [t for t in find_targets(meta) if t.block == 0]
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [meta.get_submodule(t.name).register_forward_pre_hook(
        lambda _m, args, kind=t.kind: calls.append((kind, args[0]))) for t in first]
    try:
        with torch.no_grad():      # not ``inference_mode``: without a KV cache transformers
            ids = torch.zeros(1, 8, dtype=torch.long, device="meta")    # reads mask values
            run_block(blocks[0], capture_block_inputs(meta, blocks, [ids])[0])
    except Exception as exc:            # any architecture the meta device cannot run
        log.info("no shared statistics found on the meta device (%s): none assumed", exc)
        return []
    finally:
        for h in handles:
            h.remove()
    return [g for g in fed_alike(calls) if len(g) > 1]


def fed_alike(calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """The names of ``calls`` (name, input), in call order, grouped by the tensor they are fed:
    a call fed the very object the call before it was fed joins that call's group; a name
    called again keeps its first group. The same object, where ``_Accumulator`` compares data
    pointers: every meta tensor's is 0, so that test would call any two inputs of one shape
    the same (``shared_inputs`` runs on the meta device; ``refit`` orders its passes by it)."""
    owner: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for i, (name, x) in enumerate(calls):
        if name in owner:
            continue
        owner[name] = owner[calls[i - 1][0]] if i and x is calls[i - 1][1] else name
        groups.setdefault(owner[name], []).append(name)
    return list(groups.values())


def collect_stats(model: nn.Module, targets: list[Target], windows: torch.Tensor, *,
                  gram: bool = True, absmean: bool = True, batch_size: int = 8,
                  on_block: Callable[[int, dict[str, LayerStats]], None] | None = None,
                  progress: Callable[[Iterable], Iterable] = lambda it: it,
                  ) -> dict[str, LayerStats]:
    """Statistics of every target's input over ``windows`` (n, L), block by block.

    With ``on_block`` each block's statistics are handed over as soon as they are complete
    and not kept (bounded memory); otherwise all are returned. In a process group each
    process forwards its share of ``windows`` and the sums are over all of them (collective).
    """
    _, blocks = find_blocks(model)
    modules = dict(model.named_modules())
    by_block: dict[int, list[str]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t.name)
    width = {t.name: t.n for t in targets}
    batches = list(distributed.my_share(windows).split(batch_size))
    result: dict[str, LayerStats] = {}
    with inference_mode(model):
        states = capture_block_inputs(model, blocks, batches)
        for b in progress(range(len(blocks))):
            names = by_block.get(b, [])
            widths = {n: width[n] for n in names}
            for share in (True, False):        # again without sharing if it did not hold
                acc = _Accumulator({n: modules[n] for n in names}, gram, absmean, share)
                try:
                    out = [s.with_hidden(run_block(blocks[b], s)) for s in states]
                finally:
                    acc.close()
                if acc.consistent:
                    break
            states = out
            if on_block is not None:
                on_block(b, acc.summed(widths))
            else:
                result.update(acc.summed(widths))
    return result


def collect_stats_naive(model: nn.Module, targets: list[Target], windows: torch.Tensor, *,
                        gram: bool = True, absmean: bool = True, batch_size: int = 8
                        ) -> dict[str, LayerStats]:
    """Reference: one full forward pass over the calibration set per target layer.

    Kept for the benchmark (``bench/stats_decompose.py``) and as a cross-check in tests.
    """
    modules = dict(model.named_modules())
    result = {}
    with inference_mode(model):
        for t in targets:
            acc = _Accumulator({t.name: modules[t.name]}, gram, absmean)
            try:
                for ids in windows.split(batch_size):
                    model(input_ids=ids.to(next(model.parameters()).device))
            finally:
                acc.close()
            result.update(acc.stats)
    return result
