"""SVD-LLM (Wang et al. 2024) as a rank selector: uniform ranks on the whitened decomposition.

The common reference row of the comparison. It is the ``uniform`` selector; what makes it
SVD-LLM is the decomposition, so it is registered for that one only (the registry refuses others, naming the fix)
rather than silently producing a plain uniform plan under SVD-LLM's name. Use ``uniform``
for uniform ranks on ``svd`` or ``asvd``.
"""
from __future__ import annotations

from .base import SelectConfig, SelectionContext
from .registry import register_selector
from .uniform import select_uniform


# The registry refuses any decomposition but whitening, naming the fix.
@register_selector("svdllm", decompositions=("whiten",), preferred="whiten")
def select_svdllm(ctx: SelectionContext, cfg: SelectConfig):
    plan = select_uniform(ctx, cfg)
    plan.method = "svdllm"
    return plan
