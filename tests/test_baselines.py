"""Baseline selectors STRS, D-Rank and SVD-LLM: budgets met, the STRS block cache and disk
cache, the D-Rank Lagrange allocation and Q/K -> V rebalance. Tiny random models check
plumbing; the demo model checks the budgets on trained weights."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEMO, WIKI_VALID, tiny_ids, tiny_model
from llrc_core import calibrate, decompose_model, load_model, select_plan
from llrc_core.apply import low_rank_from, swap_module_
from llrc_core.evaluate import perplexity
from llrc_core.models import find_targets
from llrc_core.selectors import SelectionContext
from llrc_core.selectors.drank import (DRankConfig, effective_rank, lagrange_ranks,
                                       rebalance_qk_to_v, select_drank)
from llrc_core.selectors.strs import BlockRunner, STRSConfig, _score_fn

TOL = 0.005
# One row per method: (name, decomposition, options).
METHODS = [
    ("strs", "asvd", {"candidates": [0.3, 0.6]}),
    ("drank", "whiten", {}),
    ("svdllm", "whiten", {}),
]


def _llama(seed=0):
    """Tiny GQA Llama, wide enough that one rank step is < 0.005 of the target layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    model = _llama()
    windows = tiny_ids(4, 16)
    return model, windows, {d: decompose_model(model, d, windows) for d in ("asvd", "whiten")}


@pytest.mark.parametrize("scope", ["linear", "model"])
@pytest.mark.parametrize("method,decomposition,opts", METHODS)
def test_tiny_meets_target(tiny, tmp_path, method, decomposition, opts, scope):
    model, windows, decs = tiny
    plan = select_plan(model, decs[decomposition], method, windows, cache_dir=str(tmp_path),
                       ratio=0.7, scope=scope, **opts)
    assert plan.method == method
    assert 0.7 - TOL <= plan.ratio(scope) <= 0.7 + 1e-9


@pytest.fixture(scope="module")
def demo_setup():
    loaded = load_model(DEMO, device="cpu", dtype="float32")
    windows = calibrate(loaded, str(WIKI_VALID), 4, 64)
    decs = {d: decompose_model(loaded.model, d, windows) for d in ("asvd", "whiten")}
    return loaded, windows, decs


@pytest.mark.parametrize("scope", ["linear", "model"])
@pytest.mark.parametrize("method,decomposition,opts", METHODS)
def test_demo_meets_target(demo_setup, tmp_path_factory, method, decomposition, opts, scope):
    loaded, windows, decs = demo_setup
    cache = tmp_path_factory.getbasetemp() / "strs-demo"     # shared: one table for both scopes
    plan = select_plan(loaded.model, decs[decomposition], method, windows, cache_dir=str(cache),
                       ratio=0.8, scope=scope, **({**opts, "max_windows": 2} if opts else {}))
    assert 0.8 - TOL <= plan.ratio(scope) <= 0.8 + 1e-9
    assert len(plan.layers) == 36


# --------------------------------------------------------------------------- STRS
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_strs_fast_path_equals_full_forward(arch):
    model = tiny_model(arch)
    windows = tiny_ids(3, 16)
    runner = BlockRunner(model, windows, batch_size=2)
    score = _score_fn(runner)
    assert score(runner.forward_from(0)) == pytest.approx(perplexity(model, windows, 2)["ppl"],
                                                          rel=1e-5)
    dec = decompose_model(model, "svd")
    target = [t for t in find_targets(model) if t.block == 1][0]
    old = model.get_submodule(target.name)
    swap_module_(model, target.name, low_rank_from(old, dec.factors[target.name], [0, 1]))
    try:
        full = perplexity(model, windows, 2)["ppl"]
        fast = score(runner.forward_from(1))
    finally:
        swap_module_(model, target.name, old)
    assert fast == pytest.approx(full, rel=1e-5)
    base = score(runner.forward_from(0))
    assert abs(fast - base) > 1e-7 * base                                  # the swap mattered
    assert list(type(b).__name__ for b in runner.blocks).count("_PassThrough") == 0


def test_strs_second_run_uses_disk_cache(tiny, tmp_path):
    model, windows, decs = tiny
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        opts = dict(ratio=0.7, candidates=[0.3, 0.6], cache_dir=str(tmp_path))
        first = select_plan(model, decs["asvd"], "strs", windows, **opts)
        n_first = len(calls)
        second = select_plan(model, decs["asvd"], "strs", windows, **opts)
        n_second = len(calls) - n_first
        other = select_plan(model, decs["asvd"], "strs", windows[:2], **opts)
    finally:
        handle.remove()
    layers = len(find_targets(model))
    assert first.meta["sensitivity_passes"] == layers * 2 and not first.meta["cache_hit"]
    assert n_first >= layers * 2
    assert second.meta["sensitivity_passes"] == 0 and second.meta["cache_hit"]
    assert n_second == 0                                   # not a single forward pass
    assert second.ranks() == first.ranks()
    assert other.meta["cache_hit"] is False                # other calibration: other key


def test_strs_threshold_takes_smallest_candidate_under_threshold():
    from llrc_core.selectors.strs import ranks_at_threshold
    shapes = {"a": (64, 64), "b": (64, 64)}
    table = {"a": {"0.25": 9.0, "0.5": 5.0}, "b": {"0.25": 4.0, "0.5": 3.0}}
    assert ranks_at_threshold(table, shapes, 4.5) == {"a": 32, "b": 8}   # a dense, b at 0.25
    assert ranks_at_threshold(table, shapes, 5.0) == {"a": 16, "b": 8}


@pytest.mark.parametrize("cls,bad", [(STRSConfig, {"candidates": []}),
                                     (STRSConfig, {"candidates": [0.5, 1.2]}),
                                     (STRSConfig, {"max_windows": 0}),
                                     (DRankConfig, {"beta": 1.5})])
def test_configs_reject_bad_values(cls, bad):
    with pytest.raises(ValueError):
        cls(**bad)


@pytest.mark.parametrize("cls", [STRSConfig, DRankConfig])
def test_configs_round_trip(cls):
    cfg = cls(ratio=0.6)
    assert cls.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- D-Rank
def _synthetic(shapes, decays, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spectra = {}
    for (name, (m, n)), tau in zip(shapes.items(), decays):
        r = min(m, n)
        s = torch.exp(-torch.arange(r, dtype=torch.float64) / tau)
        spectra[name] = (s * (1 + 0.01 * torch.rand(r, generator=gen, dtype=torch.float64))
                         ).sort(descending=True).values
    return SelectionContext(shapes, spectra, total_params=sum(m * n for m, n in shapes.values()))


@pytest.mark.parametrize("entropy_case,expected", [("flat", 50.0), ("one", 1.0)])
def test_effective_rank(entropy_case, expected):
    s = torch.ones(50) if entropy_case == "flat" else torch.tensor([3.0] + [0.0] * 49)
    assert effective_rank(s) == pytest.approx(expected, rel=1e-9)


def test_drank_follows_lagrange_formula():
    shapes = {f"layers.{i}.mlp.fc": (256, 192) for i in range(6)}
    ctx = _synthetic(shapes, decays=[2, 5, 10, 20, 40, 80])
    plan = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0))
    budget = ctx.budget(0.5, "linear")
    reff = {n: effective_rank(s) for n, s in ctx.spectra.items()}
    ideal = lagrange_ranks(reff, {n: 448 for n in shapes}, budget)
    for n in shapes:   # k = T sqrt(R / w) / sum sqrt(R w): rounding and fix-up move it by <= 1
        assert abs(plan.ranks()[n] - ideal[n]) <= 1.0, (n, plan.ranks()[n], ideal[n])
    ranks = [plan.ranks()[n] for n in shapes]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] / 3   # more energy spread, more rank
    assert 0.5 - TOL <= plan.ratio("linear") <= 0.5


def test_drank_rebalance_moves_qk_rank_to_v_in_parameter_units():
    # GQA shapes: k and v are narrower than q, so one V rank is cheaper than one Q rank.
    shapes = {}
    for b in range(2):
        shapes.update({f"layers.{b}.attn.q_proj": (256, 256), f"layers.{b}.attn.k_proj": (64, 256),
                       f"layers.{b}.attn.v_proj": (64, 256)})
    roles = {n: (int(n.split(".")[1]), n.split(".")[-1][0]) for n in shapes}
    ranks = {n: 10 if n.endswith("v_proj") else 40 for n in shapes}   # v break-even: 52
    moved = rebalance_qk_to_v(ranks, roles, shapes, beta=0.3)
    for b in range(2):
        q, k, v = (f"layers.{b}.attn.{x}_proj" for x in "qkv")
        assert moved[q] == 28 and moved[k] == 28
        freed = 12 * 512 + 12 * 320
        assert moved[v] == 10 + freed // 320 and freed - (moved[v] - 10) * 320 < 320
    ctx = _synthetic(shapes, decays=[20] * 6)
    base = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0)).ranks()
    reb = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.3))
    assert reb.ranks()["layers.0.attn.v_proj"] > base["layers.0.attn.v_proj"]
    assert reb.ranks()["layers.0.attn.q_proj"] < base["layers.0.attn.q_proj"]
    assert 0.5 - TOL <= reb.ratio("linear") <= 0.5


def test_drank_even_pool_spreads_every_blocks_qk_share_over_all_v():
    """``pool="even"`` (the reference code): the Q and K share of both blocks (different
    sizes) is one pool, and each V gets the same number of ranks from it."""
    shapes = {f"layers.{b}.attn.{x}_proj": (128, 128) for b in range(2) for x in "qkv"}
    roles = {n: (int(n.split(".")[1]), n.split(".")[-1][0]) for n in shapes}
    ranks = {n: (10 if n.endswith("v_proj") else 40 if ".0." in n else 20) for n in shapes}
    block = rebalance_qk_to_v(ranks, roles, shapes, beta=0.5)
    even = rebalance_qk_to_v(ranks, roles, shapes, beta=0.5, pool="even")
    assert (block["layers.0.attn.v_proj"], block["layers.1.attn.v_proj"]) == (50, 30)
    assert (even["layers.0.attn.v_proj"], even["layers.1.attn.v_proj"]) == (40, 40)
    assert all(even[n] == block[n] for n in shapes if not n.endswith("v_proj"))


def test_drank_fallback_keeps_uniform_where_its_truncation_error_is_lower():
    """Three layers with a hundredth of the others' energy but the same decay: the
    effective-rank allocation ignores energy, so uniform ranks drop less of the spectrum; with
    ``fallback`` that type takes uniform ranks (and says so). On equal energies the
    effective-rank allocation is kept."""
    from llrc_core.selectors.drank import truncation_error
    shapes = {f"layers.{i}.mlp.fc": (256, 192) for i in range(6)}
    ctx = _synthetic(shapes, decays=[2, 5, 10, 20, 40, 80])
    kept = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0, fallback=True))
    assert kept.meta["uniform_types"] == [] and kept.ranks() == \
        select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0, fallback=False)).ranks()
    for i, n in enumerate(shapes):
        if i >= 3:
            ctx.spectra[n] = ctx.spectra[n] * 0.01
    paper = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0, fallback=False)).ranks()
    ref = select_drank(ctx, DRankConfig(ratio=0.5, beta=0.0))            # the default
    assert ref.meta["uniform_types"] == ["mlp.fc"]
    assert max(ref.ranks().values()) - min(ref.ranks().values()) <= 5   # landing moves a few
    err = {k: sum(truncation_error(ctx.spectra[n], r[n]) for n in shapes)
           for k, r in (("paper", paper), ("ref", ref.ranks()))}
    assert err["ref"] < err["paper"] / 2
    assert 0.5 - TOL <= ref.ratio("linear") <= 0.5


# --------------------------------------------------------------------------- SVD-LLM
def test_svdllm_is_uniform_on_whitening_and_refuses_other_decompositions(tiny):
    model, windows, decs = tiny
    plan = select_plan(model, decs["whiten"], "svdllm", ratio=0.6)
    uni = select_plan(model, decs["whiten"], "uniform", ratio=0.6)
    assert plan.ranks() == uni.ranks() and plan.method == "svdllm"
    with pytest.raises(ValueError, match="whiten"):
        select_plan(model, decs["asvd"], "svdllm", ratio=0.6)
    assert math.isclose(plan.ratio("linear"), 0.6, abs_tol=TOL)
