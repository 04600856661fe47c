"""Refitting the output factors to the compressed model's inputs (``llrc_core.refit``): the
least-squares solution, no change where a layer's inputs did not change, a lower output error,
the plan and size kept, the dense model restored, one process equal to two, and the CLI's
``--refit`` run whose export reproduces the refitted model."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import DEMO, WIKI_TEST, WIKI_VALID, tiny_ids, tiny_model
from llrc_core.apply import LowRankLinear, restore_
from llrc_core.decompose import refit_output
from llrc_core.models import count_params
from llrc_core.pipeline import compress_, decompose_model, select_plan
from llrc_core.refit import refit_, refit_windows
from test_distributed import _free_port, process_group


def test_refit_output_is_the_least_squares_solution():
    """``A`` minimises ``||W X - A B X'||`` (checked against ``lstsq``), and a Gram of fewer
    tokens than inputs (singular) still gives a finite answer."""
    g = torch.Generator().manual_seed(0)
    W, B = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    X = torch.randn(8, 50, generator=g, dtype=torch.float64)
    Xc = X + 0.3 * torch.randn(8, 50, generator=g, dtype=torch.float64)
    A = refit_output(W, B, X @ Xc.T, Xc @ Xc.T)
    ref = torch.linalg.lstsq((B.double() @ Xc).T, (W.double() @ X).T).solution.T
    assert torch.allclose(A, ref, atol=1e-9)
    few = Xc[:, :2]                                   # 2 tokens, 8 inputs, 3 kept directions
    assert torch.isfinite(refit_output(W, B, X[:, :2] @ few.T, few @ few.T)).all()


def _final_error(model, dense_out, ids) -> float:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True).hidden_states[-1]
    return ((out - dense_out).pow(2).sum() / dense_out.pow(2).sum()).item()


def test_refit_keeps_the_plan_lowers_the_error_and_restores(shared_data):
    """On the demo model (uniform ranks on whitened factors, rho 0.6): the layers of block 0
    fed the embeddings see the dense inputs, so their refit equals the whitened truncation;
    the last state's error to the dense model on the calibration windows drops; ranks and
    parameter count stay; ``restore_`` gives back the dense logits exactly."""
    from llrc_core.models import load_model
    from llrc_core.pipeline import calibrate
    loaded = load_model(DEMO, "cpu")
    model = loaded.model
    windows = calibrate(loaded, WIKI_VALID, 16, 128, seed=0)
    with torch.no_grad():
        dense_logits = model(windows[:2]).logits
        dense_out = model(windows, output_hidden_states=True).hidden_states[-1]
    dec = decompose_model(model, "whiten", windows)
    plan = select_plan(model, dec, "uniform", ratio=0.6)
    compress_(model, dec, plan)
    before_a = {n: m.A.weight.clone() for n, m in model.named_modules()
                if isinstance(m, LowRankLinear)}
    params, before = count_params(model), _final_error(model, dense_out, windows)
    assert refit_(model, windows) == len(before_a) == 36
    after = _final_error(model, dense_out, windows)
    assert after < 0.8 * before, (before, after)
    first = [n for n in before_a if ".layer.0.attention.self." in n]       # query, key, value
    assert len(first) == 3
    for n, a in before_a.items():
        now = model.get_submodule(n).A.weight
        moved = ((now - a).norm() / a.norm()).item()
        assert (moved < 1e-3) if n in first else (moved > 1e-3), (n, moved)
        assert model.get_submodule(n).rank == plan.layers[n].rank
    assert count_params(model) == params
    restore_(model)
    with torch.no_grad():
        assert torch.equal(model(windows[:2]).logits, dense_logits)


def test_refit_windows_are_fresh_windows_of_the_calibration_text(shared_data):
    """``refit_windows``: n windows of the same length from the calibration text, none of
    them one the selection calibrated on; 0 is None (the calibration windows)."""
    from llrc_core.models import load_model
    from llrc_core.pipeline import calibrate
    loaded = load_model(DEMO, "cpu")
    calib = calibrate(loaded, WIKI_VALID, 32, 128, seed=0)
    fresh = refit_windows(loaded, WIKI_VALID, 64, 128, seed=0)
    assert fresh.shape == (64, 128) and fresh.dtype == calib.dtype
    assert not (fresh[:, None, :] == calib[None, :, :]).all(-1).any()
    assert torch.equal(fresh, refit_windows(loaded, WIKI_VALID, 64, 128, seed=0))  # seeded
    assert refit_windows(loaded, WIKI_VALID, 0, 128) is None
    with pytest.raises(ValueError, match="0 .the calibration windows. or more; got -2"):
        refit_windows(loaded, WIKI_VALID, -2, 128)


def _refitted(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    dec = decompose_model(model, "whiten", windows)
    compress_(model, dec, select_plan(model, dec, "uniform", ratio=0.5))
    refit_(model, windows, batch_size=2)
    return {n: m.A.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        torch.save(_refitted(tiny_ids(8, 16)), os.path.join(out, f"refit{rank}.pt"))


def test_two_gloo_processes_refit_as_one(tmp_path):
    """Each of two processes forwards half the windows; the summed Grams give both the
    one-process factors (up to float rounding of the differently cut sums)."""
    torch.set_num_threads(1)
    one = _refitted(tiny_ids(8, 16))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"refit{r}.pt", weights_only=True) for r in range(2)]
    assert len(one) == 14 and two[0].keys() == one.keys()
    for n, a in one.items():
        assert torch.equal(two[0][n], two[1][n])
        assert ((two[0][n] - a).norm() / a.norm()).item() < 1e-4, n


def test_cli_refit_exports_the_refitted_model(tmp_path, shared_data, capsys):
    """``compress --refit``: the report says so and its perplexity is below the same run's
    without refit, on the calibration windows or on 48 fresh ones (``--refit-windows``);
    ``eval`` on the export reproduces it (the refitted factors are written)."""
    from llrc_core.cli import main
    common = ["--model", str(DEMO), "--method", "uniform", "--ratio", "0.6",
              "--decomposition", "whiten", "--calib", str(WIKI_VALID), "--n-calib", "16",
              "--seq-len", "128", "--eval-text", str(WIKI_TEST), "--max-eval-windows", "4"]
    reports = {}
    for flag in ((), ("--refit",), ("--refit", "--refit-windows", "48")):
        out = tmp_path / f"out{len(flag)}"
        assert main(["compress", *common, *flag, "--out", str(out)]) == 0
        capsys.readouterr()
        reports[len(flag)] = json.loads((out / "report.json").read_text())
    off, on, fresh = reports[0], reports[1], reports[3]
    assert on["refit"] is True and on["refit_seconds"] > 0 and off["refit"] is False
    assert on["refit_windows"] == 16 and fresh["refit_windows"] == 48
    assert on["ranks"] == off["ranks"] == fresh["ranks"]
    for refitted in (on, fresh):
        assert refitted["ppl_after"] < off["ppl_after"], (refitted, off["ppl_after"])
    assert fresh["ppl_after"] != on["ppl_after"]          # fitted on other windows
    assert main(["eval", "--model", str(tmp_path / "out1"), "--text", str(WIKI_TEST),
                 "--max-windows", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(on["ppl_after"],
                                                                        rel=1e-4)
