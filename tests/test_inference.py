"""The fast low-rank layer, layers stored dense at export, and the inference bench's smoke mode.

Nothing here asserts a speed (timings belong in bench/): layer timings are only checked for
their shape and for the shares they are paired with; which layers a timing picks is tested
with fixed numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_ids, tiny_model
from llrc_core.apply import LowRankLinear, low_rank_from
from llrc_core.decompose import svd
from llrc_core.errors import ModelLoadError
from llrc_core.export import export_model, load_compressed, load_dense, stored_dense_of
from llrc_core.hf_remote import modeling_llrc as remote
from llrc_core.pipeline import compress_, decompose_model, select_plan
from llrc_core.speed import StoredDense, choose_stored_dense, pick_slow, time_layers


# --- the layer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_low_rank_layers_compute_a_of_b_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(24, 5, generator=g), torch.randn(5, 40, generator=g)
    bias, x = torch.randn(24, generator=g), torch.randn(3, 7, 40, generator=g)
    core = LowRankLinear.from_factors(A.to(dtype), B.to(dtype), bias.to(dtype))
    loader = remote.LowRankLinear(40, 24, 5, dtype=dtype)
    loader.load_state_dict(core.state_dict())
    x = x.to(dtype)
    with torch.no_grad():
        want = core.A(core.B(x))                       # the two nn.Linear calls it replaces
        assert torch.equal(core(x), want) and torch.equal(loader(x), want)
    assert core.A.weight.dtype == core.B.weight.dtype == dtype
    assert core.A.weight.is_contiguous() and core.B.weight.is_contiguous()


def test_factors_are_contiguous_in_the_module_dtype():
    lin = nn.Linear(48, 32).to(torch.float16)
    factors = svd(lin.weight.detach().float())            # float32 factors, U (32, 32) slices
    layer = low_rank_from(lin, factors, [0, 2, 5])          # non-prefix: gathered columns
    for p in (layer.A.weight, layer.B.weight, layer.A.bias):
        assert p.dtype == torch.float16 and p.is_contiguous()
    assert layer.A.weight.shape == (32, 3) and layer.B.weight.shape == (3, 48)


# --- timing and the choice of layers to store dense -----------------------------------------------

@pytest.fixture(scope="module")
def compressed():
    model, ids = tiny_model("llama"), tiny_ids()
    dec = decompose_model(model, "svd")
    plan = select_plan(model, dec, "uniform", ratio=0.7)
    compress_(model, dec, plan)
    return model, plan, ids


def test_time_layers_covers_every_low_rank_layer(compressed):
    model, plan, _ = compressed
    t = time_layers(model, plan, rounds=1, min_run_time=0.001)
    low = {n: lp for n, lp in plan.layers.items() if not lp.dense}
    assert set(t) == set(low) and low
    for name, row in t.items():
        lp = low[name]
        assert row["saved_share"] == pytest.approx(1 - lp.rank * (lp.m + lp.n) / (lp.m * lp.n),
                                                   abs=1e-4)
        assert row["factorised_us"] > 0 and row["dense_us"] > 0


def test_pick_slow_needs_both_slower_and_a_small_saving():
    t = {"a": {"saved_share": 0.05, "factorised_us": 12.0, "dense_us": 10.0},   # picked
         "b": {"saved_share": 0.05, "factorised_us": 9.0, "dense_us": 10.0},    # faster
         "c": {"saved_share": 0.30, "factorised_us": 12.0, "dense_us": 10.0},   # saves a lot
         "d": {"saved_share": 0.10, "factorised_us": 12.0, "dense_us": 10.0}}   # at the bound
    assert list(pick_slow(t, 0.1)) == ["a"]
    assert list(pick_slow(t, 0.0)) == []
    assert sorted(pick_slow(t, 1.0)) == ["a", "c", "d"]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_dense_below_out_of_range_is_refused(compressed, bad):
    model, plan, _ = compressed
    with pytest.raises(ValueError, match="dense_below"):
        choose_stored_dense(model, plan, bad)


# --- export with layers stored dense --------------------------------------------------------------

def _recomputed(plan, names):
    """Stored ratios by hand: each named layer costs m n instead of k (m + n)."""
    extra = sum(plan.layers[n].m * plan.layers[n].n - plan.layers[n].params for n in names)
    kept = plan.kept_linear + extra
    other = plan.total_params - plan.dense_linear
    return kept / plan.dense_linear, (other + kept) / plan.total_params


@pytest.mark.parametrize("arch", ["llama", "gpt2"])    # gpt2: Conv1D stores W transposed
def test_export_with_layers_stored_dense(tmp_path, monkeypatch, arch):
    model, ids = tiny_model(arch), tiny_ids()
    dec = decompose_model(model, "svd")
    plan = select_plan(model, dec, "uniform", ratio=0.6)
    compress_(model, dec, plan)
    low = [n for n, lp in plan.layers.items() if not lp.dense]
    names = [low[0], low[-1]]
    dense = StoredDense(0.5, layers={n: {"saved_share": 0.4, "factorised_us": 2.0,
                                         "dense_us": 1.0} for n in names})
    folder = export_model(model, None, plan, tmp_path / "out", dense=dense)
    with torch.no_grad():
        ref = model(ids).logits

    cfg = json.loads((folder / "config.json").read_text())["llrc"]
    lin, mod = _recomputed(plan, names)
    assert cfg["format"] == 3
    assert cfg["storage"]["stored_ratio_linear"] == pytest.approx(lin, abs=1e-12)
    assert cfg["storage"]["stored_ratio_model"] == pytest.approx(mod, abs=1e-12)
    assert lin > plan.ratio("linear") + 0.01           # the saving given up is visible
    assert cfg["ratio_linear"] == pytest.approx(plan.ratio("linear"))   # the selection's
    assert sorted(cfg["stored_dense"]["layers"]) == sorted(names)
    assert {n for n, e in cfg["plan"]["layers"].items() if e.get("stored") == "dense"} == \
        set(names)
    card = (folder / "README.md").read_text()
    assert f"{lin:.4f} / {mod:.4f}" in card and all(f"`{n}`" in card for n in names)
    total = sum(p.numel() for p in model.parameters())
    header = 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    size = (folder / "model.safetensors").stat().st_size - header
    assert abs(size - mod * plan.total_params * 4) <= 0.01 * total * 4

    # both loaders: the same logits as the in-memory model; named layers plain again
    got, _, plan2 = load_compressed(folder)
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    rem = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    for m in (got, rem):
        with torch.no_grad():
            assert (m(ids).logits - ref).abs().max().item() <= 1e-5
        assert not hasattr(m.get_submodule(names[0]), "rank")
        assert hasattr(m.get_submodule(low[1]), "rank")       # still factorised
    assert plan2.to_dict()["layers"] == plan.to_dict()["layers"]     # the function's plan
    assert stored_dense_of(folder).layers == dense.layers

    # re-export keeps them dense; merged and dense loads still agree with the model
    from llrc_core.cli import main
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())["llrc"]
    assert again["storage"]["stored_ratio_linear"] == pytest.approx(lin, abs=1e-12)
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "merged"),
                 "--merged-dense"]) == 0
    for m in (load_compressed(tmp_path / "merged")[0], load_dense(folder)[0]):
        with torch.no_grad():
            assert (m(ids).logits - ref).abs().max().item() <= 1e-4


def test_a_layer_marked_dense_but_written_factorised_is_refused(tmp_path, compressed):
    model, plan, _ = compressed
    folder = export_model(model, None, plan, tmp_path / "out")
    cfg = json.loads((folder / "config.json").read_text())
    name = next(n for n, e in cfg["llrc"]["plan"]["layers"].items() if e["kept"] is not None)
    cfg["llrc"]["plan"]["layers"][name]["stored"] = "dense"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_compressed(folder)


def test_cli_dense_below_reports_what_it_stores(tmp_path, compressed, capsys):
    """Which layers run slower is the machine's business; the report must add up either way."""
    from llrc_core.cli import main
    model, plan, ids = compressed
    src = export_model(model, None, plan, tmp_path / "src")
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "out"),
                 "--dense-below", "1.0"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    lin, mod = _recomputed(plan, res["layers_stored_dense"])
    assert res["stored_ratio_linear"] == pytest.approx(lin, abs=1e-12)
    assert res["stored_ratio_model"] == pytest.approx(mod, abs=1e-12)
    assert res["plan_ratio_linear"] == pytest.approx(plan.ratio("linear"))
    assert f"stored rho_linear {lin:.4f}" in captured.err
    rule = json.loads((tmp_path / "out" / "config.json").read_text())["llrc"].get(
        "stored_dense", {"layers": {}})
    assert sorted(rule["layers"]) == res["layers_stored_dense"]
    for row in rule["layers"].values():        # picked: slower and saving under the share
        assert row["factorised_us"] > row["dense_us"] and row["saved_share"] < 1.0
    got = load_compressed(tmp_path / "out")[0]
    with torch.no_grad():
        assert (got(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


# --- the bench in smoke mode ----------------------------------------------------------------------

@pytest.mark.slow
def test_inference_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "inference.py"), "--smoke",
                          "--json", str(out), "--workdir", str(tmp_path / "work")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["threads"] == 1 and res["settings"]["batches"] == [1, 2]
    assert res["timer"] == "process CPU time" and res["stored_dtype"] == "float32"
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["dense"] + [f"rho{r}-{w}" for r in (0.9, 0.8, 0.6)
                                      for w in ("remote", "llrc")]
    dense = rows["dense"]
    for name, r in rows.items():
        for work, tokens in (("prefill_b1", 32), ("prefill_b2", 64), ("decode_b1", 4),
                             ("decode_b2", 8)):
            assert r[f"{work}_tok_s"] == pytest.approx(tokens / r[f"{work}_cpu_s"])
            assert r[f"{work}_s"] > 0 and r[f"{work}_vs_dense"] > 0
            assert r[f"{work}_wall_vs_dense"] > 0
        if name == "dense":     # paired with itself
            assert r["file_vs_dense"] == r["decode_b2_vs_dense"] == 1.0
            continue
        assert abs(r["plan_ratio_linear"] - r["target_ratio"]) <= 0.01
        assert r["stored_ratio_linear"] == r["plan_ratio_linear"]     # no --dense-below
        # the file holds rho_model of the dense parameters (plus a small header)
        assert abs(r["file_vs_dense"] - r["stored_ratio_model"]) <= 0.02
        assert r["param_bytes"] < dense["param_bytes"]
        assert r["max_abs_logit_diff_vs_in_memory"] <= 1e-5
    for name in ("dense", "rho0.6-remote", "rho0.6-llrc"):      # smoke: these get a process
        r = rows[name]
        assert r["peak_mb"] >= r["after_load_mb"] >= r["before_load_mb"] > 0, r
    assert "peak_mb" not in rows["rho0.9-llrc"]
