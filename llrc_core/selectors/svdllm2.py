"""SVD-LLM V2 (Wang et al., NAACL 2025, arXiv 2503.12340) as a rank selector.

Two changes to SVD-LLM, no fine-tuning:

* **Loss-optimised truncation** is the decomposition ``whiten-eig``
  (``decompose.eigen_whiten``): ``X X^T = Q Lambda Q^T``, SVD of ``W Q Lambda^(1/2)``, mapped
  back by ``Lambda^(-1/2) Q^T``; eigenvalues under ``1e-6 x`` the mean diagonal are clamped to
  that floor, so a singular Gram never fails (Cholesky is never called).
* **Heterogeneous ratios** (this file), the paper's Algorithm 1 as implemented here:

  1. ``R = 1 - budget / dense_linear``: the paper's compression ratio (fraction removed) of
     the target layers, from the budget of either scope (``linear`` or ``model``).
  2. Group the target matrices by type across blocks (all q, all k, ..., all down:
     ``Target.kind``).
  3. Per matrix, its rank at the uniform ratio, ``k0 = int((1 - R) m n / (m + n))`` (SVD-LLM's
     own rank rule), and the theoretical minimum truncation loss there,
     ``L_min = sqrt(sum_{i >= k0} S_i^2)`` over the whitened spectrum, which is
     ``||W X - W' X||_F`` over the calibration tokens.
  4. Within a group ``G``: ``v_i = 1 / log L_min,i`` and ``R_i = |G| R v_i / sum_j v_j``, the
     compression ratio of matrix ``i``. A larger loss gives a smaller ``v`` and so less
     compression; the group's mean ratio stays ``R`` (same-shaped matrices: its budget share).
  5. Kept fraction ``1 - R_i`` clipped to ``[0, 1]``, ideal rank ``(1 - R_i) m n / (m + n)``;
     ranks are its floor clipped to ``[1, break-even]`` (break-even: dense, as everywhere).

What the paper leaves open, and what is chosen here:

* Whether ``R`` is the removed or the kept fraction: removed, as "compression ratio" in every
  SVD-LLM paper and SVD-LLM's code (``--ratio 0.2`` keeps 80 %); read as kept, matrices with
  a larger loss would be given fewer parameters, against the paper's stated intent.
* The units of ``L_min``: ``log`` makes the allocation depend on its scale. The Gram is summed
  over calibration tokens (as SVD-LLM's code accumulates it), so the loss grows with the
  number of tokens. Norm or squared norm does not matter (the factor 2 cancels in ``v``).
* ``L_min <= 1`` makes ``1 / log L_min`` infinite or negative: such a group keeps the uniform
  ratio ``R`` and the plan says so in ``warnings``.
* Rounding and the exact budget (the paper has neither): floor, then ``land_on_budget`` adds
  ranks where the deficit ``(ideal - k) / break-even`` is largest (largest remainder), removing
  where a layer is furthest above its ideal while over budget (after clipping to rank 1), so
  the budget holds in both scopes and each rank is within about one of the formula's.
* Which spectrum: whatever whitened decomposition the plan is for. Registered for
  ``whiten-eig`` (preferred: the paper's pair) and ``whiten`` (Cholesky; the same spectrum
  when the Gram is positive definite, i.e. V2's allocation on V1's truncation).
* ``allocation="uniform"`` keeps SVD-LLM's uniform ranks (V2's truncation alone, an ablation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..counting import break_even
from .base import SelectConfig, SelectionContext, land_on_budget
from .drank import _kinds
from .registry import register_selector
from .uniform import select_uniform

ALLOCATIONS = ("loss", "uniform")


@dataclass
class SVDLLM2Config(SelectConfig):
    allocation: str = option("loss", "loss: ratios from each matrix's truncation loss within "
                             "its type (the paper); uniform: SVD-LLM's uniform ranks")

    def __post_init__(self):
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got "
                             f"{self.allocation!r}; 'loss' is the paper's")


def uniform_rank(m: int, n: int, keep: float) -> int:
    """SVD-LLM's rank at kept fraction ``keep``: ``int(keep m n / (m + n))``."""
    return int(keep * m * n / (m + n))


def truncation_loss(S: torch.Tensor, k: int) -> float:
    """Theoretical minimum truncation loss keeping ``k`` values: ``sqrt(sum_{i>=k} S_i^2)``."""
    return float(S.detach().double().cpu()[k:].pow(2).sum().sqrt())


def heterogeneous_ratios(losses: dict[str, float], R: float) -> dict[str, float] | None:
    """The paper's compression ratio of each matrix of one group: ``|G| R v_i / sum v_j`` with
    ``v = 1 / log L_min``; ``None`` when a loss is at most 1 (``log`` not positive)."""
    if any(not loss > 1.0 for loss in losses.values()):
        return None
    v = {n: 1.0 / math.log(loss) for n, loss in losses.items()}
    total = sum(v.values())
    return {n: len(v) * R * v[n] / total for n in v}


@register_selector("svdllm2", SVDLLM2Config, decompositions=("whiten-eig", "whiten"),
                   preferred="whiten-eig")
def select_svdllm2(ctx: SelectionContext, cfg: SVDLLM2Config):
    if cfg.allocation == "uniform":
        plan = select_uniform(ctx, cfg)
        plan.method = "svdllm2"
        return plan
    budget = ctx.reachable_budget(cfg)
    keep = budget / ctx.dense_linear                        # kept fraction of the targets
    R = 1.0 - keep                                          # the paper's compression ratio
    groups: dict[str, list[str]] = {}
    for name, (_, kind) in _kinds(ctx).items():
        groups.setdefault(kind, []).append(name)
    losses = {n: truncation_loss(ctx.spectra[n], uniform_rank(m, d, keep))
              for n, (m, d) in ctx.shapes.items()}
    ratios, warnings = {}, []
    for kind, names in groups.items():
        got = heterogeneous_ratios({n: losses[n] for n in names}, R)
        if got is None:
            warnings.append({"kind": "uniform_group", "group": kind, "message": (
                f"{kind}: a truncation loss is at most 1, so 1/log(loss) is undefined; this "
                "type keeps the uniform ratio (more calibration tokens raise the losses)")})
        ratios.update(got or {n: R for n in names})
    kept = {n: min(max(1.0 - r, 0.0), 1.0) for n, r in ratios.items()}
    ideal = {n: kept[n] * m * d / (m + d) for n, (m, d) in ctx.shapes.items()}
    be = {n: break_even(m, d) for n, (m, d) in ctx.shapes.items()}
    ranks = {n: min(max(math.floor(ideal[n]), 1), be[n]) for n in ctx.shapes}
    ranks = land_on_budget(ranks, ctx.shapes, budget,
                           lambda n, k: (ideal[n] - k) / be[n],
                           lambda n, k: (ideal[n] - (k - 1)) / be[n])
    return ctx.prefix_plan(ranks, "svdllm2", cfg, compression_ratio=R, losses=losses,
                           kept_fraction=kept, groups={g: len(v) for g, v in groups.items()},
                           warnings=warnings)
