"""The memory-lean data path (issue 11): factors stored once in the placement's dtype,
offloaded factors fetched per forward pass with no copy kept for the backward, distillation
targets in CPU memory, factors released as a plan is applied; an offloaded run gives the
same plan as an in-memory one."""
from __future__ import annotations

import weakref

import pytest
import torch

from conftest import WIKI_VALID, tiny_ids, tiny_model
from llrc_core.decompose import Factors, decompose
from llrc_core.masked import MaskedLowRank
from llrc_core.pipeline import calibrate, compress_, decompose_model, select_plan
from llrc_core.placement import Placement


def _factors(m=24, n=16, seed=0) -> Factors:
    """A random layer's factors as a run stores them (float32, contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    return Placement().store(decompose(torch.randn(m, n, generator=gen), "svd"),
                             torch.device("cpu"))


def test_placement_defaults_and_refusals():
    cpu = Placement.for_run(torch.bfloat16, "cpu")
    assert (cpu.factor_dtype, cpu.offload, cpu.park_dense) == (torch.float32, "none", False)
    gpu = Placement.for_run(torch.bfloat16, "cuda", "targets")
    assert (gpu.factor_dtype, gpu.offload_targets, gpu.offload_factors, gpu.park_dense) == \
        (torch.bfloat16, True, False, True)
    assert Placement.for_run(torch.float32, "cpu", "factors", "float16").to_dict() == \
        {"factor_dtype": "float16", "offload": "factors", "park_dense": False,
         "shard_factors_over": 1}
    with pytest.raises(ValueError, match="offload must be one of"):
        Placement.for_run(torch.float32, "cpu", "disk")
    with pytest.raises(ValueError, match="factor dtype must be 'auto' or one of"):
        Placement.for_run(torch.float32, "cpu", "none", "int8")


def test_decomposition_stores_each_layer_as_placed():
    model = tiny_model("llama")
    plain = decompose_model(model, "svd")
    lean = decompose_model(model, "svd", placement=Placement(torch.bfloat16))
    assert lean.placement.factor_dtype == torch.bfloat16
    for name, f in lean.factors.items():
        ref = plain.factors[name]
        assert (f.U.dtype, f.V.dtype, f.S.dtype) == (torch.bfloat16, torch.bfloat16,
                                                     torch.float32)
        assert torch.equal(f.U, ref.U.to(torch.bfloat16)) and torch.equal(f.S, ref.S)
        assert f.U.is_contiguous() and f.V.is_contiguous()


@pytest.mark.parametrize("bias", [False, True])
def test_offloaded_layer_computes_the_same_and_keeps_no_copy_for_backward(bias):
    """Stored float32, computed in float64: every fetch is a real copy. The outputs and the
    gradients of the mask and the input equal the in-memory layer's bit for bit; no fetched
    copy outlives the forward pass; the backward fetches what it needs again."""
    f = _factors()
    b = torch.randn(24, dtype=torch.float64) if bias else None
    x = torch.randn(3, 5, 16, dtype=torch.float64)                       # (B, T, n)
    gates = torch.rand(f.rank, dtype=torch.float64)                        # (r,)
    results = []
    for offloaded in (False, True):
        layer = MaskedLowRank(f, b, torch.float64, "cpu", offloaded=offloaded)
        layer.path = "factorised"
        copies = []
        fetch = layer._fetch
        layer._fetch = lambda t, d: (copies.append(weakref.ref(out := fetch(t, d))), out)[1]
        mask = gates.clone().requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        layer.mask = mask
        y = layer(xi)
        assert (layer.U.dtype, layer.U.data_ptr() == f.U.data_ptr()) == \
            ((torch.float32, True) if offloaded else (torch.float64, False))
        if offloaded:
            assert len(copies) == 2 and all(c() is None for c in copies)   # none kept alive
        y.pow(2).sum().backward()
        results.append((y.detach(), mask.grad, xi.grad))
        if offloaded:
            assert len(copies) > 2 and layer.fetches == len(copies)        # fetched again
    (y0, gm0, gx0), (y1, gm1, gx1) = results
    assert torch.equal(y0, y1) and torch.equal(gm0, gm1) and torch.equal(gx0, gx1)


def test_offloaded_layer_takes_the_factorised_path():
    layer = MaskedLowRank(_factors(64, 64), None, torch.float32, "cpu", offloaded=True)
    assert layer.choose(tokens=10_000) == "factorised"
    layer.offloaded = False
    assert layer.choose(tokens=10_000) == "dense"


def test_offloaded_and_in_memory_runs_give_the_same_plan(demo, monkeypatch):
    """LLRC on the demo model, a few steps: factors and targets offloaded (on a CPU the path
    runs, the memory is the same) against everything in memory."""
    windows = calibrate(demo, str(WIKI_VALID), 8, 64)
    fetches = []
    fetch = MaskedLowRank._fetch
    monkeypatch.setattr(MaskedLowRank, "_fetch",
                        lambda self, t, d: (fetches.append(1), fetch(self, t, d))[1])
    runs = {}
    for offload in ("none", "factors"):
        placement = Placement.for_run(torch.float32, "cpu", offload)
        dec = decompose_model(demo.model, "asvd", windows, placement=placement)
        events = []
        plan = select_plan(demo.model, dec, "llrc", windows, callback=events.append, steps=12,
                           ratio=0.7, mask_every=0)
        runs[offload] = ({n: lp.kept for n, lp in plan.layers.items()},
                         [e["loss"] for e in events if e["type"] == "step"], len(fetches))
        fetches.clear()
    assert runs["none"][0] == runs["factors"][0]
    assert runs["none"][1] == runs["factors"][1]                  # ==: the same losses
    assert runs["none"][2] == 0 and runs["factors"][2] >= 12 * 36 * 2   # 36 layers, U and V


def test_distillation_targets_offloaded_to_cpu_memory():
    from llrc_core.selectors.objective import Objective
    model = tiny_model("llama")
    ids = tiny_ids(4, 16)
    plain = Objective(model, ids, "distill", 2, layers=(1, 2))
    kept = Objective(model, ids, "distill", 2, layers=(1, 2), targets_device=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in kept.targets)
    assert all(torch.equal(a, b) for a, b in zip(plain.targets, kept.targets))
    idx = torch.tensor([0, 3])
    assert torch.equal(plain(idx), kept(idx))


def test_apply_releases_each_layers_factors():
    model = tiny_model("llama")
    ids = tiny_ids(2, 16)
    dec = decompose_model(model, "svd")
    plan = select_plan(model, dec, "uniform", ratio=0.5)
    compress_(model, dec, plan)
    with torch.no_grad():
        kept_logits = model(ids).logits
    from llrc_core.apply import restore_
    restore_(model)
    compress_(model, dec, plan, release=True)
    assert dec.factors == {}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, kept_logits)
