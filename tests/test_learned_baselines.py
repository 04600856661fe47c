"""ARS and ARA: the budget is met in both scopes, the model comes back exactly, runs are
deterministic, ARA's soft mask is monotone, events follow the contract, bad input is refused.

Quality is not judged here (few steps, random tiny models); see the report for demo numbers.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEMO, WIKI_VALID, tiny_ids, tiny_model
from llrc_core.apply import LowRankLinear, restore_
from llrc_core.masked import MaskedLowRank
from llrc_core.pipeline import compress_, decompose_model, select_plan
from llrc_core.selectors.ara import (ARAConfig, candidate_fractions, init_logits,
                                     rescale_counts, soft_masks, st_masks, staircase_index)
from llrc_core.gates import gumbel_sigmoid, logistic_noise
from llrc_core.selectors.ars import ARSConfig, alignment, log_ratio_reg, threshold_counts

FAST = dict(steps=3, batch_size=4)
TOL = 0.005


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_met(plan, ratio, scope):
    got = plan.ratio(scope)
    assert ratio - TOL <= got <= ratio + 1e-9, f"{plan.method}: {scope} ratio {got} vs {ratio}"


@pytest.fixture(scope="module")
def tiny():
    model, ids = tiny_model("llama"), tiny_ids(8, 16)
    return model, ids, decompose_model(model, "whiten", ids)


# --- budget -------------------------------------------------------------------------------
TINY_CASES = [  # (method, arch, decomposition, scope, ratio, selection)
    ("ars", "llama", "asvd", "linear", 0.7, "top-k"),
    ("ars", "llama", "whiten", "model", 0.8, "any-k"),
    ("ars", "gpt2", "asvd", "linear", 0.6, "top-k"),
    ("ara", "llama", "whiten", "linear", 0.7, "top-k"),
    ("ara", "llama", "whiten", "model", 0.8, "top-k"),
    ("ara", "gpt2", "asvd", "model", 0.85, "top-k"),
]


@pytest.mark.parametrize("method,arch,decomposition,scope,ratio,selection", TINY_CASES)
def test_target_met_on_tiny_models(method, arch, decomposition, scope, ratio, selection):
    model, ids = tiny_model(arch), tiny_ids(8, 16)
    dec = decompose_model(model, decomposition, ids)
    plan = select_plan(model, dec, method, ids, ratio=ratio, scope=scope, selection=selection,
                       **FAST)
    assert_met(plan, ratio, scope)
    assert (plan.method, plan.selection) == (method, selection)
    if selection == "top-k":
        assert all(lp.is_prefix for lp in plan.layers.values())


@pytest.fixture(scope="module")
def demo_setup():
    from llrc_core import load_model
    from llrc_core.pipeline import calibrate
    loaded = load_model(DEMO, device="cpu", dtype="float32")
    ids = calibrate(loaded, str(WIKI_VALID), 8, 64)
    return loaded.model, ids, decompose_model(loaded.model, "svd")


@pytest.mark.parametrize("method,scope,ratio", [("ars", "linear", 0.8), ("ars", "model", 0.85),
                                                ("ara", "linear", 0.8), ("ara", "model", 0.85)])
def test_target_met_on_demo_model(demo_setup, method, scope, ratio):
    model, ids, dec = demo_setup
    before = logits_of(model, ids[:2])
    plan = select_plan(model, dec, method, ids, ratio=ratio, scope=scope, steps=2,
                       batch_size=2)
    assert_met(plan, ratio, scope)
    assert len(plan.layers) == 36
    assert torch.equal(logits_of(model, ids[:2]), before)


# --- the model is left exactly as it was --------------------------------------------------
@pytest.mark.parametrize("method", ["ars", "ara"])
def test_model_restored_exactly(tiny, method):
    model, ids, dec = tiny
    modules = dict(model.named_modules())
    params = list(model.parameters())
    params[0].requires_grad_(False)          # a mixed set of flags must come back as it was
    flags = [p.requires_grad for p in params]
    model.train()
    before = logits_of(model.eval(), ids).clone()
    model.train()
    select_plan(model, dec, method, ids, ratio=0.7, **FAST)
    assert model.training
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert not any(isinstance(m, MaskedLowRank) for m in model.modules())
    assert torch.equal(logits_of(model.eval(), ids), before)
    params[0].requires_grad_(True)


@pytest.mark.parametrize("method", ["ars", "ara"])
def test_restored_on_error_and_plan_on_stop(tiny, method):
    model, ids, dec = tiny
    before = logits_of(model, ids).clone()

    def boom(event):
        if event["type"] == "step" and event["step"] == 2:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        select_plan(model, dec, method, ids, callback=boom, ratio=0.7, **FAST)
    assert torch.equal(logits_of(model, ids), before)

    calls = iter(range(100))
    plan = select_plan(model, dec, method, ids, should_stop=lambda: next(calls) >= 1,
                       ratio=0.7, steps=50, batch_size=4)
    assert plan.meta["stopped"] and plan.meta["steps"] == 1
    assert_met(plan, 0.7, "linear")
    assert torch.equal(logits_of(model, ids), before)


def test_refuses_a_model_with_a_plan_applied(tiny):
    model, ids, dec = tiny
    compress_(model, dec, select_plan(model, dec, "uniform", ratio=0.7))
    try:
        with pytest.raises(ValueError, match="restore_"):
            select_plan(model, dec, "ars", ids, ratio=0.7, **FAST)
        assert sum(isinstance(m, LowRankLinear) for m in model.modules()) > 0
    finally:
        restore_(model)


# --- determinism --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ars", "ara"])
def test_same_seed_same_plan(tiny, method):
    model, ids, dec = tiny
    plans = [select_plan(model, dec, method, ids, ratio=0.7, seed=3, **FAST) for _ in range(2)]
    assert [lp.kept for lp in plans[0].layers.values()] == \
           [lp.kept for lp in plans[1].layers.values()]
    drop = {"seconds"}
    assert {k: v for k, v in plans[0].meta.items() if k not in drop} == \
           {k: v for k, v in plans[1].meta.items() if k not in drop}


# --- pure maths ---------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 7, 40, 230])
def test_ara_soft_mask_is_monotone_staircase(K):
    c = candidate_fractions(100)
    J = torch.stack([staircase_index(K, c, 240)] * 4)                    # (4, 240)
    logits = torch.randn(4, 101, generator=torch.Generator().manual_seed(K)) * 3
    soft, rho = soft_masks(logits, c, J)
    assert torch.all(soft[:, 1:] <= soft[:, :-1] + 1e-6)                # non-increasing in i
    p = torch.softmax(logits, -1)
    M = (torch.arange(K)[:, None] < K * c[None, :]).float()            # explicit staircase
    assert torch.allclose(soft[:, :K], p @ M.T, atol=1e-6)
    assert torch.all(soft[:, K:] == 0)
    assert torch.allclose(rho, p @ c)


def test_ara_straight_through_mask():
    c = candidate_fractions(100)
    K, r, be = torch.tensor([20, 20]), torch.tensor([30, 30]), torch.tensor([16, 16])
    J = torch.stack([staircase_index(20, c, 20)] * 2)
    logits = torch.zeros(2, 101)
    logits[0, 70], logits[1, 0] = 8.0, 8.0       # fractions ~0.30 and ~1.0 (dense)
    logits.requires_grad_(True)
    soft, rho = soft_masks(logits, c, J)
    mask, k, dense = st_masks(soft, rho, K, r, be, 1.2, 30)
    assert k[0] == round(20 * rho[0].item()) and not dense[0] and dense[1]
    assert torch.equal(mask[0].detach(), (torch.arange(30) < k[0]).float())
    assert torch.equal(mask[1].detach(), torch.ones(30))
    (mask * torch.linspace(1, 0, 30)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_ars_mask_pieces():
    logits = torch.tensor([[5.0, 4.0, -4.0, 3.0], [4.0, -5.0, -5.0, -1e4]], requires_grad=True)
    mask, _ = gumbel_sigmoid(logits, 0.4, logistic_noise(logits.shape, torch.Generator().manual_seed(0)))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0} and mask[1, 3] == 0
    mask.sum().backward()
    assert logits.grad.abs().sum() > 0
    s = torch.tensor([[1.0, 0.5, 0.25, 0.1], [1.0, 0.5, 0.2, 0.0]])
    ranks = torch.tensor([4.0, 3.0])
    prefix = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert alignment(prefix, s, ranks) == 0
    holes = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.isclose(alignment(holes, s, ranks), torch.tensor((0.5 ** 2 + 0.25 ** 2) / 8))
    assert log_ratio_reg(torch.tensor(0.3), 0.4) == 0
    assert torch.isclose(log_ratio_reg(torch.tensor(0.8), 0.4), torch.log(torch.tensor(2.0)))


SHAPES = {"a": (64, 64), "b": (64, 128), "c": (128, 64)}   # break-even 32, 43, 43


@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.8])
def test_finalisers_meet_budget_within_one_step(ratio):
    dense = sum(m * n for m, n in SHAPES.values())
    budget = int(ratio * dense)
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(min(s), generator=gen) for n, s in SHAPES.items()}
    counts = threshold_counts(scores, SHAPES, budget)
    rho = {"a": 0.2, "b": 0.5, "c": 0.9}
    K = {n: int(1.2 * m * k / (m + k)) for n, (m, k) in SHAPES.items()}
    scaled, _ = rescale_counts(rho, K, SHAPES, budget, 1.2)
    from llrc_core.selectors.base import ranks_cost
    for found in (counts, scaled):
        assert budget - 192 <= ranks_cost(found, SHAPES) <= budget   # 192 = largest m + n


# --- objectives, events, configuration ----------------------------------------------------
@pytest.mark.parametrize("method", ["ars", "ara"])
def test_encoder_uses_distillation(method):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = tiny_ids(8, 16)
    dec = decompose_model(model, "asvd", ids)
    before = logits_of(model, ids).clone()
    plan = select_plan(model, dec, method, ids, ratio=0.7, **FAST)
    assert plan.meta["objective"] == "distill"
    assert_met(plan, 0.7, "linear")
    assert torch.equal(logits_of(model, ids), before)
    with pytest.raises(ValueError, match="distill"):
        select_plan(model, dec, method, ids, ratio=0.7, objective="lm", **FAST)


@pytest.mark.parametrize("method", ["ars", "ara"])
def test_progress_events(tiny, method):
    model, ids, dec = tiny
    events = []
    plan = select_plan(model, dec, method, ids, callback=events.append, ratio=0.7,
                       mask_every=1, **FAST)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        assert {"loss", "ratio_linear", "ratio_model", "ranks"} <= e.keys()
        assert 0 < e["ratio_linear"] <= 1 and e["loss"] == e["loss"]     # finite, not NaN
    masks = [e for e in events if e["type"] == "masks"]
    assert len(masks) == 3 and masks[0]["probs"].keys() == plan.layers.keys()
    if method == "ara":                                                 # monotone soft masks
        assert all(all(a >= b - 1e-6 for a, b in zip(p, p[1:]))
                   for p in masks[-1]["probs"].values())
    assert events[-1] == {"type": "done", "step": 3, "plan": plan.to_dict(), "stopped": False}


def test_ara_two_level_init_starts_at_the_uniform_fraction_and_broad():
    c = candidate_fractions(100)
    t = torch.tensor([0.02, 0.3, 0.45, 0.77, 0.99])     # (at 0.5 the flat softmax is exact)
    two, bump = init_logits(c, t, "two-level"), init_logits(c, t, "bump", 0.1)
    p_two, p_bump = torch.softmax(two, -1), torch.softmax(bump, -1)
    assert torch.allclose(p_two @ c, t, atol=1e-5)          # exactly at the start fraction
    for row, centre in zip(two, t):                         # two levels, split at the centre
        assert set(row.tolist()) == {0.0, row[0].item()}
        assert torch.equal(row != 0, c >= centre)
    spread = lambda p: ((p * (c - (p @ c)[:, None]) ** 2).sum(1)).sqrt()   # noqa: E731
    # Broad away from the ends (sd 0.24-0.29 against the bump's 0.10): the fraction moves
    # fast; near 0 or 1 both are narrow.
    assert (spread(p_two)[1:4] > 2 * spread(p_bump)[1:4]).all()
    # Ends: finite logits, the fraction half a candidate step inside (0, 1).
    ends = init_logits(c, torch.tensor([1.0, 1e-6]), "two-level")
    assert ends.isfinite().all()
    assert torch.allclose(torch.softmax(ends, -1) @ c, torch.tensor([0.995, 0.005]), atol=1e-5)


BAD_CONFIGS = [
    (ARSConfig, dict(tau=0), "tau"), (ARSConfig, dict(p=1.5), "p"),
    (ARSConfig, dict(steps=0), "steps"), (ARSConfig, dict(objective="mse"), "objective"),
    (ARSConfig, dict(lam=-1), "lam"), (ARAConfig, dict(k_factor=0.9), "k_factor"),
    (ARAConfig, dict(lr=0), "lr"),
    (ARAConfig, dict(candidates=0), "candidates"), (ARAConfig, dict(ratio=1.5), "ratio"),
    (ARAConfig, dict(init="uniform"), "init"),
]


@pytest.mark.parametrize("cls,fields,word", BAD_CONFIGS)
def test_bad_config_is_refused(cls, fields, word):
    with pytest.raises(ValueError, match=word):
        cls(**fields)


@pytest.mark.parametrize("cls", [ARSConfig, ARAConfig])
def test_config_round_trip_and_help(cls):
    cfg = cls(ratio=0.6, steps=7, scope="model")
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert all(cls.help()[name] for name in cfg.to_dict()
               if name not in ("ratio", "scope", "selection"))
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({"ratio": 0.5, "no_such_field": 1})
