"""SVD-LLM V2 (``svdllm2`` on ``whiten-eig``): the paper's allocation on synthetic spectra worked
out by hand, the eigen-whitened truncation (equal to Cholesky's on a positive definite Gram,
never failing and near the optimum on a singular one), budgets in both scopes."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEMO, WIKI_VALID, tiny_ids, tiny_model
from llrc_core import calibrate, decompose_model, load_model, select_plan
from llrc_core.decompose import eigen_whiten, svd, whiten
from llrc_core.selectors import SelectionContext
from llrc_core.selectors.svdllm2 import SVDLLM2Config, heterogeneous_ratios, select_svdllm2

TOL = 0.005


def flat_context(levels: dict[str, float], shape=(64, 64), extra_params=0) -> SelectionContext:
    """Layers with a flat spectrum of 64 values scaled so that, at ratio 0.5 (uniform rank
    ``int(0.5 * 64 * 64 / 128) = 16``), the dropped 48 values give ``L_min = e^level``."""
    spectra = {n: torch.full((64,), math.exp(a) / math.sqrt(48), dtype=torch.float64)
               for n, a in levels.items()}
    shapes = {n: shape for n in levels}
    total = sum(m * k for m, k in shapes.values()) + extra_params
    return SelectionContext(shapes, spectra, total, "whiten-eig")


def q(i: int) -> str:
    return f"model.layers.{i}.self_attn.q_proj"


def test_allocation_follows_the_papers_formula_by_hand():
    # L_min = e^2, e^4, e^8: v = 1/log L = 1/2, 1/4, 1/8, sum 7/8. R = 0.5 (half removed):
    # R_i = 3 * 0.5 * v_i / (7/8) = 6/7, 3/7, 3/14; kept 1/7, 4/7, 11/14 of 32 (m n / (m + n))
    # = 4.571, 18.286, 25.143 ranks: floors 4, 18, 25 (47 of the 48 the budget allows), the
    # last rank to the largest remainder (layer 0).
    ctx = flat_context({q(0): 2.0, q(1): 4.0, q(2): 8.0})
    plan = select_svdllm2(ctx, SVDLLM2Config(ratio=0.5))
    kept = plan.meta["kept_fraction"]
    assert [kept[q(i)] for i in range(3)] == pytest.approx([1 / 7, 4 / 7, 11 / 14], abs=1e-12)
    assert [plan.meta["losses"][q(i)] for i in range(3)] == \
        pytest.approx([math.exp(2), math.exp(4), math.exp(8)], rel=1e-12)
    assert plan.meta["compression_ratio"] == pytest.approx(0.5)
    assert [plan.layers[q(i)].rank for i in range(3)] == [5, 18, 25]
    assert plan.ratio("linear") == 0.5 and plan.meta["warnings"] == []
    assert (plan.method, plan.decomposition) == ("svdllm2", "whiten-eig")


def test_formula_function_keeps_the_group_mean_and_refuses_losses_at_most_one():
    got = heterogeneous_ratios({"a": math.e ** 3, "b": math.e ** 6}, 0.3)   # v = 1/3, 1/6
    assert got == pytest.approx({"a": 2 * 0.3 * (1 / 3) / 0.5, "b": 2 * 0.3 * (1 / 6) / 0.5})
    assert sum(got.values()) / 2 == pytest.approx(0.3)
    assert heterogeneous_ratios({"a": 5.0, "b": 1.0}, 0.3) is None
    assert heterogeneous_ratios({"a": 5.0, "b": 0.0}, 0.3) is None


def test_allocation_is_within_each_matrix_type():
    """Two types with very different losses: each keeps its own share of the budget (the
    paper reallocates within a type, never across), to one rank of 128 parameters."""
    down = {f"model.layers.{i}.mlp.down_proj": a for i, a in enumerate((10.0, 12.0))}
    ctx = flat_context({q(0): 2.0, q(1): 3.0, **down})
    plan = select_svdllm2(ctx, SVDLLM2Config(ratio=0.5))
    for names in ([q(0), q(1)], list(down)):
        share = sum(plan.layers[n].params for n in names) / (len(names) * 64 * 64)
        assert abs(share - 0.5) <= 128 / (2 * 64 * 64)
    assert plan.layers[q(0)].rank < plan.layers[q(1)].rank          # smaller loss: compressed more
    assert plan.ratio("linear") == 0.5


def test_a_type_with_a_loss_at_most_one_keeps_the_uniform_ratio_and_says_so():
    ctx = flat_context({q(0): -1.0, q(1): 2.0, q(2): 4.0})            # L = e^-1 < 1
    plan = select_svdllm2(ctx, SVDLLM2Config(ratio=0.5))
    assert [plan.layers[q(i)].rank for i in range(3)] == [16, 16, 16]
    [w] = plan.meta["warnings"]
    assert w["kind"] == "uniform_group" and w["group"] == "self_attn.q_proj"


@pytest.mark.parametrize("scope,ratio", [("linear", 0.7), ("model", 0.8)])
def test_budget_met_in_both_scopes_on_a_synthetic_model(scope, ratio):
    levels = {q(i): 2.0 + i for i in range(4)}
    ctx = flat_context(levels, extra_params=20_000)
    plan = select_svdllm2(ctx, SVDLLM2Config(ratio=ratio, scope=scope))
    assert ratio - TOL <= plan.ratio(scope) <= ratio + 1e-9


def test_uniform_allocation_is_svdllms_plan():
    model, ids = tiny_model("llama"), tiny_ids(8, 16)
    dec = decompose_model(model, "whiten-eig", ids)
    v2 = select_plan(model, dec, "svdllm2", ratio=0.6, allocation="uniform")
    v1 = select_plan(model, decompose_model(model, "whiten", ids), "svdllm", ratio=0.6)
    assert v2.ranks() == v1.ranks() and v2.method == "svdllm2"
    with pytest.raises(ValueError, match="allocation must be one of"):
        SVDLLM2Config(allocation="global")
    assert SVDLLM2Config.from_dict(SVDLLM2Config(ratio=0.7).to_dict()) == SVDLLM2Config(ratio=0.7)


# --------------------------------------------------------------------------- the truncation
def _problem(tokens: int, n: int = 48, m: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, n, dtype=torch.float64)[:, None]      # uneven channels
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scales   # (n, T)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, X


def _out_err(W, Wk, X) -> float:
    return float(((W - Wk.double()) @ X).norm())


def test_eigen_whitening_equals_cholesky_whitening_on_a_positive_definite_gram():
    W, X = _problem(tokens=500)
    G = X @ X.T
    fe, fc = eigen_whiten(W, G), whiten(W, G)
    assert fe.damping == 0 and fc.damping == 0
    torch.testing.assert_close(fe.S, fc.S, rtol=1e-5, atol=0)
    for k in (1, 8, 16, 31):
        torch.testing.assert_close(fe.reconstruct(range(k)), fc.reconstruct(range(k)),
                                   rtol=0, atol=1e-4 * float(W.abs().max()))
        # the theoretical loss: ||W X - W' X||_F^2 = sum of the dropped S_i^2
        assert _out_err(W, fe.reconstruct(range(k)), X) == \
            pytest.approx(float(fe.S[k:].double().pow(2).sum().sqrt()), rel=1e-4)


def test_singular_gram_never_fails_and_beats_plain_svd(monkeypatch):
    W, X = _problem(tokens=20)                       # 20 tokens, 48 inputs: rank-20 Gram
    G = X @ X.T
    assert torch.linalg.matrix_rank(G).item() == 20

    def no_cholesky(*a, **k):
        raise AssertionError("eigen-whitening must not call Cholesky")
    monkeypatch.setattr(torch.linalg, "cholesky", no_cholesky)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_cholesky)
    fe = eigen_whiten(W, G)
    fs = svd(W)
    assert fe.damping == 1e-6                        # reported like a damped Cholesky
    assert all(torch.isfinite(t).all() for t in (fe.U, fe.S, fe.V))
    torch.testing.assert_close(fe.reconstruct().double(), W, rtol=0, atol=1e-3)
    best = torch.linalg.svdvals(W @ X)               # Eckart-Young on W X: the least loss
    for k in (2, 8, 16):
        err = _out_err(W, fe.reconstruct(range(k)), X)
        assert math.isfinite(err)
        assert err <= _out_err(W, fs.reconstruct(range(k)), X)
        assert err == pytest.approx(float(best[k:].pow(2).sum().sqrt()), rel=1e-4)


def test_whiten_eig_on_a_model_with_fewer_tokens_than_inputs():
    model = tiny_model("llama")
    dec = decompose_model(model, "whiten-eig", tiny_ids(1, 8))   # 8 tokens, 32 or 64 inputs
    damped = {w["layer"] for w in dec.warnings if w["kind"] == "damped_gram"}
    assert damped == set(dec.factors)
    for name, f in dec.factors.items():
        W = dict(model.named_modules())[name].weight
        assert torch.allclose(f.reconstruct(), W, atol=1e-4), name


# --------------------------------------------------------------------------- demo model
@pytest.mark.slow
def test_demo_meets_target_in_both_scopes():
    loaded = load_model(DEMO, device="cpu", dtype="float32")
    windows = calibrate(loaded, str(WIKI_VALID), 16, 64)          # 1024 tokens
    dec = decompose_model(loaded.model, "whiten-eig", windows)
    for scope in ("linear", "model"):
        for ratio in (0.8, 0.6):
            plan = select_plan(loaded.model, dec, "svdllm2", ratio=ratio, scope=scope)
            assert ratio - TOL <= plan.ratio(scope) <= ratio + 1e-9, (scope, ratio)
            assert len(plan.layers) == 36 and len(plan.meta["groups"]) == 6
