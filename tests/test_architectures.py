"""Every supported architecture, as a tiny random model built from a config (conftest.TINY_ARCHS).

Plumbing only — targets, statistics, exact reconstruction, apply/restore, plan JSON — never
compression quality (random weights have flat spectra; the demo model judges quality).
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_ARCHS, tiny_ids, tiny_model
from llrc_core.apply import LowRankLinear, originals_of, restore_
from llrc_core.blocks import inference_mode
from llrc_core.models import count_params, find_targets, weight_of
from llrc_core.pipeline import compress_, decompose_model, make_context, select_plan
from llrc_core.plan import RankPlan
from llrc_core.selectors import SelectConfig

LLAMA_LIKE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# Expected target kinds per block, in module order (tiny models have 2 blocks).
KINDS = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma": LLAMA_LIKE,
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
            "fc1", "fc2"],
    "phi": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
            "mlp.fc1", "mlp.fc2"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"],
}
ARCHS = [row[0] for row in TINY_ARCHS]
N_BLOCKS = 2


def test_table_covers_every_architecture():
    assert sorted(KINDS) == sorted(ARCHS)


def _windows() -> torch.Tensor:
    return tiny_ids(n=8, length=32)   # (8, 32): 256 tokens, more than any input width (<= 64)


def _inputs_of(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each target's input over ``windows`` from one ordinary full forward pass: (T, n).

    Independent of the block-by-block path ``collect_stats`` takes, so it cross-checks it."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    try:
        with inference_mode(model):
            model(input_ids=windows)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_found(arch):
    model = tiny_model(arch)
    targets = find_targets(model)
    assert len(targets) == N_BLOCKS * len(KINDS[arch])
    for b in range(N_BLOCKS):
        assert [t.kind for t in targets if t.block == b] == KINDS[arch]
    for t in targets:
        W = weight_of(model.get_submodule(t.name))
        assert tuple(W.shape) == (t.m, t.n)
        assert t.transposed == (arch == "gpt2")           # GPT-2 Conv1D stores (n, m)
        assert not any(s in t.name for s in ("embed", "wte", "wpe", "lm_head"))


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_restore_gives_identical_logits(arch):
    model = tiny_model(arch)
    ids = tiny_ids(n=2, length=16)
    total = count_params(model)
    originals = {t.name: model.get_submodule(t.name) for t in find_targets(model)}
    with inference_mode(model):
        before = model(input_ids=ids).logits
    dec = decompose_model(model, "svd")
    plan = select_plan(model, dec, "uniform", ratio=0.5)
    compress_(model, dec, plan)
    swapped = [n for n, lp in plan.layers.items() if not lp.dense]
    assert len(swapped) == len(plan.layers)               # ratio 0.5: no layer at break-even
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in swapped)
    # Parameter accounting matches the real module: biases, norms and embeddings unchanged.
    assert count_params(model) == total - plan.dense_linear + plan.kept_linear
    with inference_mode(model):
        compressed = model(input_ids=ids).logits
    assert (compressed - before).abs().max() > 1e-3
    restore_(model)
    with inference_mode(model):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert all(model.get_submodule(n) is mod for n, mod in originals.items())
    assert originals_of(model) == {} and count_params(model) == total


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_round_trips_through_json(arch, tmp_path):
    model = tiny_model(arch)
    dec = decompose_model(model, "svd")
    uniform = select_plan(model, dec, "uniform", ratio=0.6, scope="model")
    # An any-k plan: scattered indices per layer, the first layer dense.
    ctx = make_context(model, dec)
    gen = torch.Generator().manual_seed(1)
    kept = {name: sorted(torch.randperm(min(m, n), generator=gen)[:5].tolist())
            for name, (m, n) in ctx.shapes.items()}
    first = next(iter(kept))
    kept[first] = None
    anyk = ctx.plan(kept, "manual", SelectConfig(ratio=0.5, selection="any-k"), note="hand")
    assert anyk.layers[first].dense and not all(lp.is_prefix for lp in anyk.layers.values())
    for plan in (uniform, anyk):
        back = RankPlan.from_json(plan.to_json())
        assert back.to_dict() == plan.to_dict()
        assert back.ranks() == plan.ranks()
        for scope in ("linear", "model"):
            assert back.ratio(scope) == plan.ratio(scope)
        plan.save(tmp_path / "plan.json")
        assert RankPlan.load(tmp_path / "plan.json").to_dict() == plan.to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_decompositions_reconstruct_at_full_rank(arch):
    model = tiny_model(arch)
    windows = _windows()
    for decomposition in ("svd", "asvd", "whiten"):
        dec = decompose_model(model, decomposition, windows)
        assert sorted(dec.factors) == sorted(t.name for t in dec.targets)
        for t in dec.targets:
            W = weight_of(model.get_submodule(t.name)).detach()
            f = dec.factors[t.name]
            assert f.rank == min(t.m, t.n)
            assert bool((f.S[:-1] >= f.S[1:]).all()), "singular values must descend"
            err = (f.reconstruct() - W).norm() / W.norm()
            assert err < 2e-4, f"{decomposition} {t.name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_whitening_truncation_error_is_dropped_energy(arch):
    """``||W X - W_k X||^2 + lambda ||W - W_k||^2 = sum of dropped S^2`` on the calibration
    activations, where ``lambda`` is the damping added to the Gram matrix (0 when it is PD).
    LayerNorm outputs at init are centred, so their Gram is singular: damped layers are covered."""
    model = tiny_model(arch)
    windows = _windows()
    dec = decompose_model(model, "whiten", windows, keep_stats=True)
    X = _inputs_of(model, [t.name for t in dec.targets], windows)
    damped = 0
    for t in dec.targets:
        f = dec.factors[t.name]
        W = weight_of(model.get_submodule(t.name)).detach().double()
        k = f.rank // 2
        D = W - f.reconstruct(list(range(k))).double()                    # (m, n)
        gram = dec.stats[t.name].gram
        assert torch.allclose(gram, X[t.name].T @ X[t.name], rtol=1e-4,
                              atol=1e-6 * gram.diagonal().mean().item())
        lam = f.damping * gram.diagonal().mean().item()
        damped += f.damping > 0
        lhs = (D @ X[t.name].T).square().sum() + lam * D.square().sum()
        rhs = f.S[k:].double().square().sum()
        # Factors are stored in float32: exact to ~1e-7 on a well-conditioned Gram, ~1e-3 where
        # the Gram is nearly singular (o_proj under GQA: condition number ~1e6).
        eig = torch.linalg.eigvalsh(gram + lam * torch.eye(t.n, dtype=gram.dtype))
        tol = 1e-5 if eig[-1] / eig[0] < 1e4 else 5e-3
        assert abs(lhs / rhs - 1) < tol, f"{t.name}: {lhs:.6g} vs dropped {rhs:.6g}"
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        assert damped == 0            # RMSNorm inputs: every Gram positive definite, no damping


@pytest.mark.parametrize("arch", ARCHS)
def test_the_planner_finds_the_statistics_a_run_shares(arch):
    """``stats.shared_inputs`` on the meta device (what the planner counts) names exactly the
    layers whose statistics a run shares (one object for layers fed one tensor)."""
    from transformers import AutoModelForCausalLM
    from llrc_core.stats import collect_stats, shared_inputs
    model = tiny_model(arch)
    targets = find_targets(model)
    got = collect_stats(model, targets, tiny_ids(n=2, length=16), batch_size=2)
    first = [t for t in targets if t.block == 0]
    run = [[t.kind for t in first if got[t.name] is got[u.name]] for u in first]
    run = sorted({tuple(sorted(g)) for g in run if len(g) > 1})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    assert sorted(tuple(sorted(g)) for g in shared_inputs(meta)) == run
    assert (len(run), arch) != (0, "llama")            # q/k/v and gate/up on a Llama
