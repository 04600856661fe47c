"""Parameter accounting shared by every method: break-even rank and both ratio scopes.

A factorised layer ``W (m x n) ~ A (m x k) B (k x n)`` stores ``k (m + n)`` numbers. At or
above the break-even rank ``ceil(m n / (m + n))`` it saves nothing, so it is kept dense and
costs ``m n``. Counts are of weight matrices; biases are kept as they are in both forms and
so cancel out of the ``linear`` ratio, while the ``model`` ratio counts every parameter of
the model (embeddings, norms, biases) once, tied weights once.
"""
from __future__ import annotations

import math

SCOPES = ("linear", "model")


def break_even(m: int, n: int) -> int:
    """Smallest rank k at which ``k (m + n) >= m n``: from there the layer stays dense."""
    return math.ceil(m * n / (m + n))


def layer_cost(m: int, n: int, k: int) -> int:
    """Parameters of an ``m x n`` weight kept at rank ``k`` (dense at or above break-even)."""
    if k >= break_even(m, n):
        return m * n
    return k * (m + n)


def check_ratio(ratio: float) -> float:
    """Validate a target parameter ratio; raise ``ValueError`` naming the fix."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1] (kept parameters / original), got {ratio!r}; "
                         "e.g. --ratio 0.8 keeps 80 % of the parameters")
    return float(ratio)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"ratio scope must be one of {SCOPES}, got {scope!r}")
    return scope


def linear_budget(ratio: float, scope: str, dense_linear: int, total_params: int) -> int:
    """Weight parameters the target layers may keep so that the ratio in ``scope`` is met.

    ``dense_linear``: weights of all target layers before compression; ``total_params``: the
    whole model before compression.
    """
    ratio, scope = check_ratio(ratio), check_scope(scope)
    if scope == "linear":
        return int(math.floor(ratio * dense_linear))
    other = total_params - dense_linear  # embeddings, norms, biases, lm_head: never decomposed
    budget = ratio * total_params - other
    if budget <= 0:
        raise ValueError(
            f"model-scope ratio {ratio} is unreachable: the parameters that are not decomposed "
            f"already make {other / total_params:.3f} of the model; use a ratio above that or "
            "--ratio-scope linear")
    return int(math.floor(budget))


def ratios(costs: int, dense_linear: int, total_params: int) -> dict[str, float]:
    """Achieved ratio in both scopes given the kept weight parameters ``costs``."""
    return {"linear": costs / dense_linear,
            "model": (total_params - dense_linear + costs) / total_params}
