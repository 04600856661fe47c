"""Core units (counting, decompositions, calibration, statistics) and the demo model end to end.

Compression quality is judged only on the demo model (trained weights); tiny random models are
for plumbing.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DEMO, WIKI_TEST, WIKI_VALID, tiny_ids, tiny_model, tiny_tokenizer
from llrc_core.apply import restore_
from llrc_core.calibration import CalibConfig, load_calibration, read_local_text, tokenize
from llrc_core.counting import break_even, check_ratio, layer_cost, linear_budget, ratios
from llrc_core.decompose import asvd, cholesky_damped, decompose, svd, whiten
from llrc_core.errors import CalibrationError, DecompositionError
from llrc_core.evaluate import eval_windows, perplexity
from llrc_core.models import find_targets, load_model
from llrc_core.pipeline import calibrate, compress_, decompose_model, select_plan
from llrc_core.plan import LayerPlan
from llrc_core.selectors import SelectConfig, SelectionContext, get_selector
from llrc_core.stats import collect_stats, collect_stats_naive

# ------------------------------------------------------------------------------ counting ------
# (m, n, break-even rank ceil(m n / (m + n)))
BREAK_EVEN = [(32, 32, 16),          # 16 * 64 == 32 * 32: the equality case is dense
              (64, 32, 22),          # 2048 / 96 = 21.3
              (384, 1536, 308),      # demo model MLP
              (4096, 11008, 2986)]   # Llama-2-7B MLP


@pytest.mark.parametrize("m,n,be", BREAK_EVEN)
def test_break_even_layer_is_dense_and_costs_mn(m, n, be):
    assert break_even(m, n) == be == break_even(n, m)
    assert (be - 1) * (m + n) < m * n <= be * (m + n)
    assert layer_cost(m, n, be - 1) == (be - 1) * (m + n)
    assert layer_cost(m, n, be) == layer_cost(m, n, min(m, n)) == m * n
    at = LayerPlan(m, n, list(range(be)))
    below = LayerPlan(m, n, list(range(be - 1)))
    assert at.dense and at.kept is None and at.params == m * n and at.rank == min(m, n)
    assert not below.dense and below.params == (be - 1) * (m + n) and below.rank == be - 1
    # any-k: break-even counts kept indices, wherever they are
    assert LayerPlan(m, n, list(range(1, be + 1))).dense


def test_ratios_in_both_scopes_by_hand():
    # 1000 weights in target layers of a 3000-parameter model; 600 kept.
    assert ratios(600, 1000, 3000) == {"linear": 0.6, "model": 2600 / 3000}
    assert linear_budget(0.6, "linear", 1000, 3000) == 600
    assert linear_budget(0.9, "model", 1000, 3000) == 700          # 2700 - 2000 not decomposed
    with pytest.raises(ValueError, match="unreachable"):
        linear_budget(0.6, "model", 1000, 3000)                     # 1800 < 2000 fixed params
    for bad in (0, 0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            check_ratio(bad)
    with pytest.raises(ValueError, match="scope"):
        linear_budget(0.5, "layers", 1000, 3000)


def _demo_like_context() -> SelectionContext:
    """The demo model's 36 target shapes (MiniLM-L6) with random decaying spectra; the rest of
    the model (embeddings, norms, biases) is 12.1 M parameters, as in MiniLM."""
    gen = torch.Generator().manual_seed(0)
    shapes, spectra = {}, {}
    for b in range(6):
        for kind, (m, n) in [("q", (384, 384)), ("k", (384, 384)), ("v", (384, 384)),
                             ("o", (384, 384)), ("up", (1536, 384)), ("down", (384, 1536))]:
            name = f"layer.{b}.{kind}"
            shapes[name] = (m, n)
            decay = torch.linspace(0, 1, min(m, n)) * (1 + torch.rand(1, generator=gen).item())
            spectra[name] = torch.exp(-3 * decay)
    dense = sum(m * n for m, n in shapes.values())
    return SelectionContext(shapes, spectra, dense + 12_100_000)


@pytest.mark.parametrize("method", ["uniform", "energy"])
@pytest.mark.parametrize("scope,ratio", [("linear", 0.3), ("linear", 0.5), ("linear", 0.8),
                                         ("linear", 0.95), ("model", 0.6), ("model", 0.8),
                                         ("model", 0.95)])
def test_selector_hits_ratio(method, scope, ratio):
    ctx = _demo_like_context()
    spec = get_selector(method)
    plan = spec.select(ctx, spec.config(ratio=ratio, scope=scope))
    achieved = plan.ratio(scope)
    assert ratio - 0.005 < achieved <= ratio + 1e-12, f"{method} {scope}: {achieved}"
    assert plan.kept_linear <= ctx.budget(ratio, scope)
    assert all(lp.is_prefix for lp in plan.layers.values())


def test_ratio_one_keeps_everything_dense():
    ctx = _demo_like_context()
    plan = get_selector("uniform").select(ctx, SelectConfig(ratio=1.0))
    assert all(lp.dense for lp in plan.layers.values())
    assert plan.ratio("linear") == plan.ratio("model") == 1.0


def test_unreachable_model_scope_ratio_is_a_clear_error():
    ctx = _demo_like_context()   # undecomposed parameters are ~53 % of the model
    with pytest.raises(ValueError, match=r"unreachable.*0\.53.*--ratio-scope linear"):
        get_selector("uniform").select(ctx, SelectConfig(ratio=0.4, scope="model"))
    with pytest.raises(ValueError, match="rank 1 in every layer"):
        get_selector("uniform").select(ctx, SelectConfig(ratio=0.001))


# -------------------------------------------------------------------------- decompositions ---
def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_any_subset_of_factors():
    W = torch.randn(24, 40, generator=_gen())
    f = svd(W)
    idx = [0, 3, 7, 19]
    A, B = f.factors(idx)
    assert A.shape == (24, 4) and B.shape == (4, 40)
    expect = f.U[:, idx] @ torch.diag(f.S[idx]) @ f.V[idx]
    assert torch.allclose(A @ B, expect, atol=1e-5)
    assert (f.reconstruct() - W).norm() / W.norm() < 1e-5


def test_asvd_with_unit_scaling_is_plain_svd():
    W = torch.randn(24, 40, generator=_gen())
    assert torch.allclose(asvd(W, torch.ones(40)).S, svd(W).S, rtol=1e-5)
    s = torch.rand(40, generator=_gen(1)) + 0.1
    f = asvd(W, s, alpha=0.5)
    assert torch.allclose(f.S, svd(W * s.sqrt()).S, rtol=1e-4)     # spectrum of W D
    assert (f.reconstruct() - W).norm() / W.norm() < 1e-5


def test_cholesky_of_positive_definite_gram_is_undamped():
    X = torch.randn(16, 64, generator=_gen(), dtype=torch.float64)
    G = X @ X.T
    L, damp = cholesky_damped(G)
    assert damp == 0.0 and torch.allclose(L @ L.T, G)


def test_cholesky_damps_a_rank_deficient_gram():
    X = torch.randn(16, 6, generator=_gen(), dtype=torch.float64)  # 6 tokens, 16 channels
    G = X @ X.T                                                     # rank 6 of 16
    assert torch.linalg.cholesky_ex(G).info.item() != 0
    L, damp = cholesky_damped(G)
    scale = G.diagonal().mean()
    assert 0 < damp < 1e-3 and torch.isfinite(L).all()
    assert torch.allclose(L @ L.T, G + damp * scale * torch.eye(16, dtype=G.dtype))
    # whitening still reconstructs W exactly at full rank and records the damping
    W = torch.randn(8, 16, generator=_gen(1))
    f = whiten(W, G)
    assert f.damping == damp
    assert (f.reconstruct() - W).norm() / W.norm() < 1e-4


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN"), (float("inf"), "NaN/Inf"),
                                       (0.0, "zero")])
def test_broken_gram_is_a_clear_error(bad, match):
    G = torch.eye(8, dtype=torch.float64)
    G[2, 3] = G[3, 2] = bad
    if bad == 0.0:
        G = torch.zeros(8, 8, dtype=torch.float64)
    with pytest.raises(DecompositionError, match=match):
        whiten(torch.randn(4, 8), G)


def test_unknown_decomposition_is_a_clear_error():
    with pytest.raises(ValueError, match="decomposition must be one of"):
        decompose(torch.randn(4, 4), "qr")


# ---------------------------------------------------------------------------- calibration ----
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    lines = WIKI_VALID.read_text(encoding="utf-8").splitlines()[:300]
    return [ln for ln in lines if ln.strip()]


def _write_sources(root, paragraphs) -> dict:
    half = len(paragraphs) // 2
    (root / "c.txt").write_text("\n".join(paragraphs), encoding="utf-8")
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    (root / "c.json").write_text(json.dumps(paragraphs))                 # list of strings
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(paragraphs[:half]), encoding="utf-8")
    (folder / "b.json").write_text(json.dumps([{"text": p} for p in paragraphs[half:]]))
    return {"txt": root / "c.txt", "jsonl": root / "c.jsonl", "json": root / "c.json",
            "folder": folder}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "folder"])
def test_local_calibration_sources(kind, tmp_path, tokenizer, paragraphs):
    src = _write_sources(tmp_path, paragraphs)[kind]
    w = load_calibration(tokenizer, CalibConfig(str(src), n_samples=6, seq_len=48, seed=0))
    assert w.shape == (6, 48) and w.dtype == torch.long
    ids = tokenize(tokenizer, read_local_text(src))
    assert ids.numel() > 5000
    starts = ids.unfold(0, 48, 1)                                       # (N - 47, 48)
    for row in w:                                                       # each window is real text
        assert (starts == row).all(1).any()
    same = load_calibration(tokenizer, CalibConfig(str(src), 6, 48, seed=0))
    other = load_calibration(tokenizer, CalibConfig(str(src), 6, 48, seed=1))
    assert torch.equal(w, same) and not torch.equal(w, other)


def test_too_little_or_no_calibration_text(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("just a few words here")
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    (tmp_path / "none").mkdir()
    cases = [("tiny.txt", r"tokens, fewer than one window of 64"),
             ("empty.txt", "is empty"),
             ("bad.jsonl", "'text' field"),
             ("none", "no .txt/.jsonl/.json files"),
             ("missing.txt", "neither an existing file")]
    for name, match in cases:
        with pytest.raises(CalibrationError, match=match):
            load_calibration(tokenizer, CalibConfig(str(tmp_path / name), 4, 64))
    for bad in (dict(n_samples=0), dict(seq_len=1)):
        with pytest.raises(ValueError):
            CalibConfig(str(tmp_path / "tiny.txt"), **bad)


def test_selfgen_on_a_tiny_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = CalibConfig("selfgen", n_samples=3, seq_len=12, seed=0)
    w = load_calibration(tok, cfg, model)
    assert w.shape == (3, 12) and int(w.max()) < model.config.vocab_size
    assert torch.equal(w, load_calibration(tok, cfg, model))           # seeded
    assert not set(w[:, 0].tolist()) & set(tok.all_special_ids)          # starts are real tokens
    with pytest.raises(CalibrationError, match="needs the model"):
        load_calibration(tok, cfg)


# ----------------------------------------------------------------------------- statistics ---
class _SwitchingBlock(torch.nn.Module):
    """``b`` is fed ``a``'s input on odd calls and a tensor of its own on even ones."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.calls = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), 0

    def forward(self, h):
        self.calls += 1
        return self.a(h) + self.b(h if self.calls % 2 else 2 * h)


class _Switching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.blocks = torch.nn.Embedding(16, 4), torch.nn.ModuleList([_SwitchingBlock()])

    def forward(self, input_ids):
        return self.blocks[0](self.emb(input_ids))


def test_stats_of_a_layer_whose_sharing_changes_are_collected_alone():
    """A layer fed its neighbour's input in one batch and its own in the next: the block is
    collected again without sharing, and the sums equal each layer's own pass."""
    torch.manual_seed(0)
    model = _Switching()
    targets = find_targets(model)
    windows = tiny_ids(n=4, length=8, vocab=16)
    fast = collect_stats(model, targets, windows, batch_size=2)          # 2 batches
    model.blocks[0].calls = 0
    slow = collect_stats_naive(model, targets, windows, batch_size=2)   # b: calls 3 and 4
    assert fast["blocks.0.a"] is not fast["blocks.0.b"]
    for name in fast:
        assert fast[name].tokens == slow[name].tokens == 32
        assert torch.allclose(fast[name].gram, slow[name].gram, rtol=1e-6)
        assert torch.allclose(fast[name].abs_sum, slow[name].abs_sum, rtol=1e-6)


@pytest.mark.parametrize("arch,shared", [("llama", [("q_proj", "k_proj", "v_proj"),
                                                     ("gate_proj", "up_proj")]),
                                          ("gpt2", [])])
def test_block_by_block_stats_equal_naive(arch, shared):
    """Block by block, layers fed one tensor sharing one statistics object (Llama: q, k, v
    and gate, up), equal to each layer's own pass over the model."""
    model = tiny_model(arch)
    targets = find_targets(model)
    windows = tiny_ids(n=6, length=16)
    fast = collect_stats(model, targets, windows, batch_size=4)        # 2 batches
    slow = collect_stats_naive(model, targets, windows, batch_size=4)
    assert sorted(fast) == sorted(slow) == sorted(t.name for t in targets)
    for name in fast:
        assert fast[name].tokens == slow[name].tokens == 96
        g = slow[name].gram
        assert torch.allclose(fast[name].gram, g, rtol=1e-5, atol=1e-7 * g.abs().max().item())
        assert torch.allclose(fast[name].abs_mean, slow[name].abs_mean, rtol=1e-5)
    for b in range(2):
        block = [t.name for t in targets if t.block == b]
        groups = {id(fast[m]): [n.rsplit(".", 1)[1] for n in block if fast[n] is fast[m]]
                  for m in block}
        assert sorted(tuple(g) for g in groups.values() if len(g) > 1) == sorted(shared)
        assert len(groups) == len(block) - sum(len(g) - 1 for g in shared)
    # bounded-memory mode: each block handed over once, in order, nothing returned
    seen = []
    assert collect_stats(model, targets, windows,
                         on_block=lambda b, s: seen.append((b, sorted(s)))) == {}
    assert [b for b, _ in seen] == [0, 1]
    assert sum(len(names) for _, names in seen) == len(targets)


# ----------------------------------------------------------------------------- demo model ---
N_CALIB, N_EVAL, SEQ = 16, 8, 256   # calibration windows (valid.txt), test windows, tokens each


@pytest.fixture(scope="module")
def demo_runs(shared_data):
    """The demo model compressed to rho_linear = 0.8 with uniform ranks in each decomposition,
    restored between variants: {name: (plan, ppl)} plus the dense perplexity.

    Runs on one thread: on a busy 2-core machine MKL's threaded SVD was measured ~10x slower
    than single-threaded (and whitening is 36 SVDs); the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_runs()
    finally:
        torch.set_num_threads(threads)


def test_eval_windows_first_or_spread_evenly_over_the_text():
    """A capped evaluation takes the text's first windows, or as many spread evenly over all
    of it: the first and the last window among them, distinct, evenly spaced."""
    tok = tiny_tokenizer()
    full = eval_windows(tok, WIKI_TEST, 64)
    total = len(full)
    assert total > 500
    assert torch.equal(eval_windows(tok, WIKI_TEST, 64, 8), full[:8])
    spread = eval_windows(tok, WIKI_TEST, 64, 8, "spread")
    where = {tuple(row.tolist()): i for i, row in enumerate(full)}
    index = [where[tuple(row.tolist())] for row in spread]
    assert index[0] == 0 and index[-1] == total - 1
    gaps = torch.tensor(index).diff()
    step = (total - 1) / 7
    assert gaps.min() >= math.floor(step) and gaps.max() <= math.ceil(step)
    assert torch.equal(eval_windows(tok, WIKI_TEST, 64, total + 5, "spread"), full)
    with pytest.raises(ValueError, match="first"):
        eval_windows(tok, WIKI_TEST, 64, 8, "random")
    with pytest.raises(ValueError, match="at least one window"):
        eval_windows(tok, WIKI_TEST, 64, 0)


def _demo_runs() -> dict:
    loaded = load_model(DEMO, device="cpu", dtype="float32")
    model = loaded.model
    windows = calibrate(loaded, str(WIKI_VALID), N_CALIB, SEQ)
    ev = eval_windows(loaded.tokenizer, WIKI_TEST, SEQ, N_EVAL)
    probe = ev[:1, :64]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    runs = {"dense": (None, perplexity(model, ev)["ppl"])}
    for name in ("svd", "asvd", "whiten"):
        dec = decompose_model(model, name, windows)
        plan = select_plan(model, dec, "uniform", ratio=0.8)
        compress_(model, dec, plan)
        runs[name] = (plan, perplexity(model, ev)["ppl"])
        restore_(model)
    with torch.no_grad():
        runs["restored_equal"] = torch.equal(logits, model(input_ids=probe).logits)
    return runs


def test_demo_uniform_meets_ratio(demo_runs):
    for name in ("svd", "asvd", "whiten"):
        plan, _ = demo_runs[name]
        assert len(plan.layers) == 36
        assert abs(plan.ratio("linear") - 0.8) <= 0.005
        assert plan.ranks() == demo_runs["svd"][0].ranks()     # uniform ignores spectra
    assert demo_runs["restored_equal"]


def test_demo_whitening_beats_asvd_beats_svd(demo_runs):
    ppl = {k: v[1] for k, v in demo_runs.items() if k != "restored_equal"}
    print("demo ppl (8 test windows x 256):", {k: round(v, 1) for k, v in ppl.items()})
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["dense"] < ppl["whiten"] < ppl["asvd"] < ppl["svd"] < 2 * ppl["dense"]
