"""Refit each low-rank layer's output factor to the inputs the compressed model feeds it.

A decomposition fits ``A B`` to the dense model's inputs ``X``, but once the layers before it
are compressed, a layer sees ``X'`` instead, and the errors add up block after block. With
``B`` (the kept input directions, the selection) fixed, the output factor that best restores
the dense layer's output is a least-squares solution (``decompose.refit_output``):

    A = argmin ||W X - A B X'||_F = W (X X'^T) B^T (B X' X'^T B^T)^-1

Fine-tuning-free and closed form, the same step sequential pruning and quantisation take
(SparseGPT and GPTQ feed each layer the already-compressed model's inputs); the rank, the
kept indices and the parameter count do not change. Only ``A`` moves: refitting ``B`` as well
(the best rank-k map from ``X'``, a new basis, so an any-k choice is lost) overfitted 16
calibration windows on the demo model; with 128 it helped SVD-LLM's uniform ranks a little
but not LLRC's learned ones, whose widest layers it overfits (bench/README.md).

Block by block (``blocks.py``): the dense and the compressed hidden states enter each block;
its low-rank layers are taken in the order the block calls them, those fed one tensor (q, k,
v) together, so each is refitted on the inputs of its already-refitted predecessors. Every
pass stops as soon as the layers it is for have their inputs. Under ``torchrun`` each process
forwards its share of the windows and the two Gram sums are all-reduced, so every process
refits alike.

Memory above the applied model: the dense and the compressed hidden states of every
calibration window at one block (and the next block's being made), the block's dense
originals back on its device, one batch's inputs and two float64 ``n x n`` sums. The memory
planner counts it as the ``refit`` phase (``footprint.refit_bytes``; ``llrc plan-memory
--refit``, and ``compress --refit`` checks it before loading): for Llama-2-7B (bf16, 64 x 512
tokens, 8 windows a batch) 18.0 GiB on one GPU, under the decomposition's 37.2 GiB peak.
Refitted on windows of its own (``refit_windows``, ``--refit-windows``), the states are
those windows' (``plan-memory --refit --refit-windows N`` counts them).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed
from .apply import LowRankLinear, originals_of, swap_module_
from .blocks import BlockInput, capture_block_inputs, inference_mode, run_block
from .decompose import refit_output
from .models import find_blocks, weight_of
from .stats import fed_alike


class _Enough(Exception):
    """Raised by a hook once the layers a pass is for have their inputs."""


def _low_rank_of(prefix: str, b: int, block: nn.Module) -> list[str]:
    """Full names of the block's ``LowRankLinear`` layers."""
    return [f"{prefix}.{b}.{n}" for n, m in block.named_modules() if isinstance(m, LowRankLinear)]


@contextmanager
def _dense(model: nn.Module, names: list[str]):
    """The block's dense originals back in place of ``names`` (each on its low-rank layer's
    device while in), then the low-rank layers again."""
    originals, swapped = originals_of(model), []
    try:
        for n in names:
            low, old = model.get_submodule(n), originals[n]
            home = weight_of(old).device
            old.to(low.B.weight.device)
            swapped.append((n, low, old, home))
            swap_module_(model, n, old)
        yield
    finally:
        for n, low, old, home in swapped:
            swap_module_(model, n, low)
            old.to(home)


def _inputs(model: nn.Module, block: nn.Module, state: BlockInput, names: list[str]
            ) -> dict[str, torch.Tensor]:
    """The inputs of ``names`` (tokens, n) in one run of ``block``, stopped once all are in."""
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        def grab(_m, args):
            got[name] = args[0].reshape(-1, args[0].shape[-1])
            if len(got) == len(names):
                raise _Enough
        return grab
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run_block(block, state)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _stages(model: nn.Module, block: nn.Module, state: BlockInput, names: list[str]
            ) -> list[list[str]]:
    """``names`` in the order the block calls them, grouped where one tensor feeds several."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0]))) for n in names]
    try:
        run_block(block, state)
    finally:
        for h in handles:
            h.remove()
    return fed_alike(calls)


def refit_(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, eps: float = 1e-6,
           progress: Callable[[Iterable], Iterable] = lambda it: it) -> int:
    """Refit the output factor of every ``LowRankLinear`` of an applied plan
    (``apply.apply_plan_``) on the calibration ``windows`` (n, L); returns how many layers
    were refitted. ``apply.restore_`` still gives back the dense model."""
    prefix, blocks = find_blocks(model)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("refit needs the model's weights in memory; it does not run on a "
                         "sequentially onloaded model: compress without --refit")
    batches = list(distributed.my_share(windows).split(batch_size))
    done = 0
    with inference_mode(model):
        compressed = capture_block_inputs(model, blocks, batches)
        dense = list(compressed)                       # the same embeddings enter block 0
        for b in progress(range(len(blocks))):
            block, names = blocks[b], _low_rank_of(prefix, b, blocks[b])
            for stage in (_stages(model, block, compressed[0], names) if names else []):
                n0 = stage[0]
                cross = gram = None
                for d_in, c_in in zip(dense, compressed):
                    with _dense(model, names):
                        x = _inputs(model, block, d_in, [n0])[n0].double()      # (T, n)
                    xc = _inputs(model, block, c_in, [n0])[n0].double()         # (T, n)
                    cross = x.T @ xc if cross is None else cross.addmm_(x.T, xc)
                    gram = xc.T @ xc if gram is None else gram.addmm_(xc.T, xc)
                distributed.sum_([cross, gram])
                for n in stage:
                    low = model.get_submodule(n)
                    W = weight_of(originals_of(model)[n]).to(cross.device)
                    A = refit_output(W, low.B.weight, cross, gram, eps)
                    low.A.weight.copy_(A.to(low.A.weight.dtype))
                    done += 1
            with _dense(model, names):
                dense = [s.with_hidden(run_block(block, s)) for s in dense]
            compressed = [s.with_hidden(run_block(block, s)) for s in compressed]
    return done


def refit_windows(loaded, source: str, n: int, seq_len: int, seed: int = 0):
    """``n`` windows of ``seq_len`` tokens of the calibration ``source`` for the refit alone,
    drawn as the calibration is (``pipeline.calibrate``) with the next seed, so they are other
    windows than the selection's; ``None`` for ``n == 0``: the refit then takes the selection's
    own windows. On the demo model (rho 0.6, 128 calibration windows of 128 tokens) 512 such
    windows lowered the whole test set's perplexity of every refitted plan measured, more than
    1,024 did (bench/README.md, "Refit")."""
    from .pipeline import calibrate
    if n < 0:
        raise ValueError(f"refit windows must be 0 (the calibration windows) or more; got {n}")
    return calibrate(loaded, source, n, seq_len, seed + 1) if n else None
