"""Bytes one piece of a compression run holds at once, from layer shapes alone: the memory
planner's (``planner.py``) formulas for the decomposition of one layer, the layers a process
holds while the decomposition is dealt out, sharded factors, apply, the backward pass of a
training batch, and the refit and polish passes.

``c`` is the planner's counts of one model at one setting (``planner._counts``).
"""
from __future__ import annotations

from . import distributed
from .counting import break_even
from .distill import has_lm_head
from .placement import Placement


def decomposition_work(m: int, n: int, decomposition: str) -> int:
    """Bytes one ``m x n`` layer's decomposition holds at once besides its statistics, as
    ``decompose.py`` computes it (``r = min(m, n)``): LAPACK's divide-and-conquer SVD keeps
    a copy of its input and about ``7 r^2`` of workspace; whitening works in float64 with
    ``L`` (or ``Q``, ``n x n``) and ``W L`` (``m x n``), and solves ``V`` from ``Vh``; the
    float32 factors exist before they are stored."""
    r = min(m, n)
    out32 = 4 * r * (m + n)
    if decomposition in ("whiten", "whiten-eig"):
        return 8 * (n * n + 2 * m * n + m * r + 3 * r * n + 7 * r * r) + out32
    scaled = m * n if decomposition == "asvd" else 0              # W D
    return 4 * (m * n + scaled + m * n + m * r + r * n + 7 * r * r) + out32


def dealt_numbers(per_block: dict, layer_factors: dict, decomposition: str,
                  processes: int) -> int:
    """Factor numbers the fullest process holds of one block while the decomposition is
    dealt out (``pipeline.decompose_model``): each block's layers shared by
    ``distributed.deal`` as the run shares them; 0 in one process."""
    from .decompose import DECOMPOSITIONS, work
    if processes < 2:
        return 0
    method = decomposition if decomposition in DECOMPOSITIONS else "svd"
    held = 0
    for ts in per_block.values():
        owners = distributed.deal([work(t.m, t.n, method) for t in ts], processes)
        held = max(held, *(sum(layer_factors[t.name] for t, o in zip(ts, owners) if o == p)
                           for p in range(processes)))
    return held


def dealt_on_device(c: dict, placement: Placement) -> int:
    """A process holds the layers of a block it decomposed, in the factor dtype, until the
    block is handed round (``dealt_numbers``)."""
    return placement.factor_dtype.itemsize * c["dealt_numbers"]


def shard_on_device(c: dict, placement: Placement) -> int:
    """Sharded factors on one process's device while masks train: its rows of every layer,
    in the model dtype, and one layer's whole factors (gathered for a pass) at a time."""
    b = c["b"]
    return -(-b * c["facts"]["factor_numbers"] // placement.shard_over) + \
        b * max(n for _, n in c["layers"])


def released_apply(c: dict, placement: Placement) -> int:
    """Apply releases each layer's factors as its kept-rank factors are made (``compress``):
    at any moment a layer holds one or the other, so the sum of the larger of the two."""
    fb = placement.factor_dtype.itemsize
    return sum(max(fb * n, c["kept_layer"][t.name]) for t, n in c["layers"])


def hidden_states_bytes(tokens: int, hidden_size: int, itemsize: int) -> int:
    """The hidden states of ``tokens`` tokens at one block, twice (a pass's two copies: the
    statistics' input and output, the refit's dense and compressed states)."""
    return 2 * tokens * hidden_size * itemsize


def refit_bytes(c: dict, batch_size: int, seq_len: int, tokens: int | None = None) -> int:
    """Bytes the refit pass (``refit.py``) holds above the applied model: the dense and the
    compressed hidden states of this process's windows at one block and the next block's
    being made (three states), the two float64 ``n x n`` sums of the widest input, one
    batch's inputs of it twice (as captured and in float64) with a block's intermediate
    values, and the solve of the largest layer (``W`` in the model dtype and in float64,
    ``W C``, ``B`` and ``B G``, the right-hand side) at the most values a low-rank layer
    keeps: one under break-even, since a layer at or above it stays dense and is not
    refitted. ``tokens``: this process's refit tokens when they are not the calibration's
    (``compress --refit-windows``)."""
    f, b = c["facts"], c["b"]
    states = f["hidden_states_block_bytes"] if tokens is None else \
        hidden_states_bytes(tokens, f["hidden_size"], b)
    ts = [t for t, _ in c["layers"]]
    n = max(t.n for t in ts)
    solve = max((8 * 2 + b) * t.m * t.n + 8 * min(t.m, t.n, break_even(t.m, t.n) - 1)
                * (2 * t.n + t.m) for t in ts)
    batch = batch_size * seq_len
    return (3 * states // 2 + 2 * 8 * n * n + solve
            + batch * (2 * (8 + b) * n + b * (4 * f["hidden_size"] + 3 * f["intermediate_size"])))


def activation_bytes(f: dict, tokens: int) -> int:
    """Activations kept for the backward pass of one batch of ``tokens`` tokens (an estimate):
    per token and block, 12 hidden-size and 5 intermediate-size values, and per masked layer
    (factorised) its two rank-size intermediates ``V x`` and ``s * (V x)``."""
    return tokens * f["itemsize"] * (f["blocks"] * (12 * f["hidden_size"]
                                                    + 5 * f["intermediate_size"])
                                     + 2 * f["spectrum_numbers"])


def polish_counts(c: dict, cfg, meta) -> dict:
    """``c`` as a polish round (``polish.py``, its ``PolishConfig`` ``cfg``) needs it, for the
    planner to count like a learned method's selection: the same masked layers, no optimiser
    state (a 0/1 mask and its gradient per layer), the backward pass of one batch of
    ``cfg.batch_tokens`` tokens. A causal LM's with its logits: they and their gradient in the
    model dtype, and four float32 arrays of their size (``losses.next_token_loss``'s shifted
    copy, its log-softmax and their gradients; measured on llama-medium, bench/README.md),
    and no targets. An encoder (``meta`` has no output embeddings) has no logits; its targets
    are the dense model's last states of every window, in the model dtype."""
    f, b, tokens = c["facts"], c["b"], cfg.batch_tokens
    encoder = not has_lm_head(meta)
    logits = 0 if encoder else tokens * f["vocab_size"] * (2 * b + 16)
    targets = cfg.windows * cfg.seq_len * f["hidden_size"] * b if encoder else 0
    return {**c, "facts": {**f, "activations_bytes_estimate": activation_bytes(f, tokens)
                           + logits, "distill_targets_bytes": targets,
                           "mask_state_bytes": 2 * b * f["spectrum_numbers"]}}
