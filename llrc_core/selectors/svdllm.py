"""SVD-LLM (Wang et al. 2024) as a rank selector: uniform ranks on the whitened decomposition.

The common reference row of the comparison. It is the ``uniform`` selector; what makes it
SVD-LLM is the decomposition, so it refuses any other one (``ValueError`` naming the fix)
rather than silently producing a plain uniform plan under SVD-LLM's name. Use ``uniform``
for uniform ranks on ``svd`` or ``asvd``.
"""
from __future__ import annotations

from .base import SelectConfig, SelectionContext, register_selector
from .uniform import select_uniform


@register_selector("svdllm")
def select_svdllm(ctx: SelectionContext, cfg: SelectConfig):
    if ctx.decomposition != "whiten":
        raise ValueError(f"svdllm is whitening + uniform ranks, but the decomposition is "
                         f"{ctx.decomposition!r}: decompose with --decomposition whiten, or use "
                         "method 'uniform' for uniform ranks on this decomposition")
    plan = select_uniform(ctx, cfg)
    plan.method = "svdllm"
    return plan


select_svdllm.preferred_decomposition = "whiten"
select_svdllm.decompositions = ("whiten",)
