"""Tables about spectra: effective rank, rank needed for an energy level, per-layer summaries.

Pure maths on singular values (tensors in, numbers out) plus row builders that the app and
notebooks turn into DataFrames. Energy of a prefix ``k``: ``sum_{i<k} S_i^2 / sum S_i^2``.
"""
from __future__ import annotations

import math

import torch

from .counting import break_even


def energy_share(S: torch.Tensor) -> torch.Tensor:
    """``p_i = S_i^2 / sum S_j^2`` in float64: (r,)."""
    s2 = S.detach().double().cpu() ** 2
    total = s2.sum()
    if total <= 0:
        raise ValueError("spectrum is all zero: the layer's weight is zero")
    return s2 / total


def cumulative_energy(S: torch.Tensor) -> torch.Tensor:
    """Energy kept by each prefix: ``c_k = sum_{i<=k} p_i``, (r,), ending at 1."""
    return torch.cumsum(energy_share(S), 0)


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli effective rank ``exp(-sum p_i log p_i)`` of the energy shares (D-Rank)."""
    p = energy_share(S)
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum().item()))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose prefix keeps at least ``energy`` (in (0, 1]) of ``sum S_i^2``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    c = cumulative_energy(S)
    # searchsorted on the cumulative curve; a tiny slack absorbs float64 rounding at 1.0.
    k = int(torch.searchsorted(c, torch.tensor(energy - 1e-12, dtype=c.dtype)).item()) + 1
    return min(k, S.numel())


def layer_rows(targets, spectra: dict[str, torch.Tensor], energy: float = 0.9) -> list[dict]:
    """A row per target layer: shape, full and break-even rank, effective rank, rank needed
    for ``energy``, largest singular value. ``targets``: ``models.Target`` list."""
    rows = []
    for t in targets:
        S = spectra[t.name]
        rows.append({"layer": t.name, "block": t.block, "module_type": t.kind, "m": t.m,
                     "n": t.n, "full_rank": S.numel(), "break_even": break_even(t.m, t.n),
                     "effective_rank": effective_rank(S),
                     f"rank_for_{energy:g}": rank_for_energy(S, energy),
                     "sigma_max": float(S.max())})
    return rows


def block_grid(rows: list[dict], value: str) -> tuple[list[int], list[str], list[list]]:
    """Pivot ``rows`` to (blocks, module types, z[block][type]) for a heatmap; missing -> None.
    Module types keep their first-seen order (the order inside a block)."""
    blocks = sorted({r["block"] for r in rows})
    kinds = list(dict.fromkeys(r["module_type"] for r in rows))
    z = [[None] * len(kinds) for _ in blocks]
    bi = {b: i for i, b in enumerate(blocks)}
    ki = {k: i for i, k in enumerate(kinds)}
    for r in rows:
        z[bi[r["block"]]][ki[r["module_type"]]] = r[value]
    return blocks, kinds, z


def mask_matrix(probs: dict[str, list[float]]) -> tuple[list[str], list[list]]:
    """Layers x singular index matrix of kept probabilities, padded with None to the longest
    spectrum (layers of different ranks share one heatmap)."""
    names = list(probs)
    width = max((len(v) for v in probs.values()), default=0)
    return names, [list(map(float, probs[n])) + [None] * (width - len(probs[n])) for n in names]
