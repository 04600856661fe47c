"""Polish (``llrc_core/polish.py``): the moves it may make, their first-order ranking, and a
polished plan on the demo model that keeps its budget and lowers the loss it reports."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DEMO, WIKI_TEST, WIKI_VALID
from llrc_core.apply import restore_
from llrc_core.blocks import inference_mode
from llrc_core.cli import main
from llrc_core.losses import next_token_loss
from llrc_core.pipeline import calibrate, compress_, decompose_model, select_plan
from llrc_core.plan import RankPlan
from llrc_core.polish import (PolishConfig, grown, moves, polish_plan, polish_report,
                               ranked_pairs, shrunk)

S = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])       # a whitened spectrum


def test_moves_keep_a_prefix_a_prefix_and_stop_short_of_break_even():
    k = frozenset(range(4))
    assert grown(k, S, 2) == frozenset(range(6)) and shrunk(k, S, 2) == frozenset(range(2))
    anyk = frozenset({0, 2, 5})                              # an any-k set: largest dropped,
    assert grown(anyk, S, 1) == {0, 1, 2, 5} and shrunk(anyk, S, 1) == {0, 2}   # smallest kept
    shapes = {"a": (8, 8), "b": (8, 8)}                     # break-even 4; 1 value = 16 params
    grow, shrink = moves({"a": frozenset({0, 1, 2}), "b": frozenset({0})}, shapes,
                         {"a": S, "b": S}, chunk=16)
    assert grow == {"b": (frozenset({0, 1}), 16)}            # a at 4 would reach break-even...
    assert shrink == {"a": (frozenset({0, 1}), 16)}          # ...and b cannot drop its last


def test_pairs_are_ranked_by_the_first_order_change_within_the_freed_parameters():
    """Adding value i changes the loss by +g_i, dropping it by -g_i: the best move takes from
    the layer whose smallest kept value matters least and gives where a dropped one helps
    most; moves predicted to raise the loss, or costing more than was freed, are left out."""
    kept = {"a": frozenset(range(3)), "b": frozenset(range(3))}
    grad = {"a": torch.tensor([-5.0, -5, -5, -9, -1, -1, -1, -1]),    # a's next value helps
            "b": torch.tensor([-5.0, -5, -0.01, -0.02, -1, -1, -1, -1])}
    grow, shrink = moves(kept, {"a": (16, 16), "b": (16, 16)}, {"a": S, "b": S}, chunk=32)
    pairs = ranked_pairs(grad, kept, grow, shrink, slack=0)
    assert [(i, j) for _, i, j in pairs] == [("b", "a")]          # a -> b would raise it
    assert pairs[0][0] == pytest.approx(0.01 - 9.0)
    dear = {"a": (grow["a"][0], grow["a"][1] + 1)}                 # one parameter too many
    assert ranked_pairs(grad, kept, dear, shrink, slack=0) == []
    assert len(ranked_pairs(grad, kept, dear, shrink, slack=1)) == 1


def _loss_of(model, windows) -> float:
    with inference_mode(model):
        return float(next_token_loss(model(input_ids=windows).logits, windows))


@pytest.mark.parametrize("path", ["factorised", "dense"])
def test_a_layer_kept_to_its_values_computes_what_its_mask_does(path):
    """``keep_only`` (polish's exact checks) gives the 0/1-masked output from the kept
    columns alone, on either matmul path; ``None`` gives the full rank back; offloaded
    factors decline it (whole only inside a forward pass) and the caller masks."""
    from llrc_core.decompose import Factors
    from llrc_core.masked import MaskedLowRank
    g = torch.Generator().manual_seed(0)
    f = Factors(torch.randn(6, 5, generator=g), torch.rand(5, generator=g) + 0.1,
                torch.randn(5, 7, generator=g))
    layer = MaskedLowRank(f, torch.randn(6, generator=g))
    layer.path = path
    x = torch.randn(3, 4, 7, generator=g)
    full = layer(x)
    layer.mask = torch.tensor([1.0, 0, 1, 0, 0])
    masked = layer(x)
    layer.mask = None
    assert layer.keep_only({2, 0}) and layer.kept.tolist() == [0, 2]
    assert torch.allclose(layer(x), masked, atol=1e-5) and layer.last_path == path
    assert not torch.allclose(masked, full, atol=1e-3)
    assert layer.keep_only(None) and layer.kept is None
    assert torch.equal(layer(x), full)
    off = MaskedLowRank(f, None, offloaded=True)
    assert off.keep_only({0}) is False and off.kept is None


def test_polish_lowers_the_loss_on_its_windows_within_the_budget(shared_data, demo):
    """Uniform ranks on whitened factors at rho 0.6: polishing moves values between layers,
    the loss it reports is the applied plan's, lower than the start's; the plan costs no more
    (equal moves on this model: exactly as much); the model comes back dense."""
    model = demo.model
    windows = calibrate(demo, WIKI_VALID, 16, 128, seed=0)
    polish_ids = calibrate(demo, WIKI_VALID, 4, 128, seed=1)
    with torch.no_grad():
        dense_logits = model(input_ids=polish_ids[:1]).logits
    dec = decompose_model(model, "whiten", windows)
    start = select_plan(model, dec, "uniform", ratio=0.6)
    events = []
    out = polish_plan(model, dec, start, polish_ids, PolishConfig(rounds=2, pairs=3),
                      events.append)
    with torch.no_grad():
        assert torch.equal(model(input_ids=polish_ids[:1]).logits, dense_logits)
    meta = out.meta["polish"]
    assert meta["moves"] >= 1 and meta["rounds_run"] >= 1
    assert meta["loss_after"] < meta["loss_before"]
    assert [e["round"] for e in events if e["type"] == "polish"] == \
        list(range(meta["rounds_run"]))
    changed = [n for n in start.layers if out.layers[n].kept != start.layers[n].kept]
    assert len(changed) >= 2 and all(out.layers[n].is_prefix for n in out.layers)
    assert out.kept_linear == start.kept_linear
    # a report reads the polish from the plan, so a stored plan evaluated again keeps it
    stored = polish_report(RankPlan.from_dict(out.to_dict()))
    assert stored["polish_moves"] == meta["moves"] and stored["polish"]["rounds"] == 2
    assert polish_report(start) == {"polish": None}
    assert (out.method, out.decomposition, out.selection) == \
        (start.method, start.decomposition, start.selection)
    assert meta["stopped"] is False
    # Stopped (the app's Stop button) after its first exact check: it ends there, with the
    # moves made so far, and says so.
    calls = []
    cut = polish_plan(model, dec, start, polish_ids, PolishConfig(rounds=2, pairs=3),
                      should_stop=lambda: calls.append(1) or len(calls) > 2).meta["polish"]
    assert cut["stopped"] is True and cut["rounds_run"] == 1
    assert cut["history"][0]["tried"] == 1 and cut["moves"] <= 1
    for plan, key in ((start, "loss_before"), (out, "loss_after")):
        compress_(model, dec, plan)
        try:
            assert _loss_of(model, polish_ids) == pytest.approx(meta[key], abs=1e-4)
        finally:
            restore_(model)


def test_polish_refuses_bad_settings():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        polish_plan(torch.nn.Linear(2, 2), None, None, torch.zeros(3, 1, dtype=torch.long),
                    PolishConfig())
    for bad in ({"rounds": 0}, {"pairs": -1}, {"seq_len": 1}):
        with pytest.raises(ValueError, match="polish"):
            PolishConfig(**bad)


def test_compress_polish_reports_it_and_exports_the_polished_plan(shared_data, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    assert main(["compress", "--model", str(DEMO), "--method", "uniform", "--ratio", "0.6",
                 "--decomposition", "whiten", "--calib", str(WIKI_VALID), "--n-calib", "16",
                 "--seq-len", "128", "--polish", "1", "--polish-windows", "4",
                 "--polish-seq-len", "128", "--eval-text", str(WIKI_TEST),
                 "--max-eval-windows", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["polish"]["rounds"] == 1 and report["polish"]["windows"] == 4
    assert report["polish_moves"] >= 1
    assert report["polish_loss_after"] < report["polish_loss_before"]
    assert abs(report["achieved_ratio_linear"] - 0.6) <= 0.005
    plan = json.loads((out / "rank_plan.json").read_text())
    ranks = {n: len(lp["kept"]) for n, lp in plan["layers"].items() if lp["kept"]}
    assert len(set(ranks.values())) > 2          # no longer uniform (q/k/v/o and MLP ranks)
    assert "polish round 0" in capsys.readouterr().err
    # checked before anything loads
    assert main(["compress", "--model", str(DEMO), "--method", "uniform", "--ratio", "0.6",
                 "--calib", str(WIKI_VALID), "--polish", "-2", "--out",
                 str(tmp_path / "bad")]) != 0
    assert "polish rounds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_polish_windows_are_spread_over_a_local_calibration_text(shared_data, demo):
    """From a local text: non-overlapping windows from its first to its last full one."""
    from llrc_core.calibration import read_local_text, tokenize
    from llrc_core.polish import polish_windows
    w = polish_windows(demo, str(WIKI_VALID), PolishConfig(windows=3, seq_len=64))
    ids = tokenize(demo.tokenizer, read_local_text(WIKI_VALID))
    last = ids.numel() // 64 - 1
    assert w.shape == (3, 64)
    assert torch.equal(w[0], ids[:64]) and torch.equal(w[2], ids[last * 64:(last + 1) * 64])


def test_an_encoder_is_polished_on_the_distance_to_its_dense_output(shared_data, tmp_path):
    """MiniLM has no next-token loss: polish lowers the cosine distance between the
    mean-pooled 32-token spans of its last states and the dense model's (LLRC's encoder
    distance). The distance it reports is the applied plan's, the budget holds, and a
    compare session and ``compress --polish`` polish MiniLM too."""
    from llrc_core.compare import CompareConfig
    from llrc_core.fidelity import resolve_model
    from llrc_core.losses import pooled_cosine
    from llrc_core.models import load_model
    from llrc_core.polish import polish_windows
    from llrc_core.session import Session
    minilm = resolve_model("minilm")
    loaded = load_model(minilm, "cpu")
    model = loaded.model
    ids = polish_windows(loaded, str(WIKI_VALID), PolishConfig(windows=4, seq_len=64))
    with inference_mode(model):
        dense = model(input_ids=ids)[0]
    dec = decompose_model(model, "asvd", calibrate(loaded, WIKI_VALID, 16, 64, seed=0))
    start = select_plan(model, dec, "uniform", ratio=0.8)
    out = polish_plan(model, dec, start, ids, PolishConfig(rounds=1, pairs=3))
    meta = out.meta["polish"]
    assert meta["moves"] >= 1 and meta["loss_after"] < meta["loss_before"]
    assert out.kept_linear == start.kept_linear
    for plan, key in ((start, "loss_before"), (out, "loss_after")):
        compress_(model, dec, plan)
        try:
            with inference_mode(model):
                h = model(input_ids=ids)[0]
            assert float(pooled_cosine(h, dense, 32)) == pytest.approx(meta[key], abs=1e-5)
        finally:
            restore_(model)
    cfg = CompareConfig(model="minilm", methods=("uniform",), calib=str(WIKI_VALID), n_calib=2,
                        seq_len=64, fidelity_lines=4, polish=1)
    assert Session(cfg, lambda _: None).polish[1].shape == (64, 256)
    dest = tmp_path / "out"
    assert main(["compress", "--model", str(minilm), "--method", "uniform", "--ratio", "0.8",
                 "--decomposition", "asvd", "--calib", str(WIKI_VALID), "--n-calib", "16",
                 "--seq-len", "64", "--polish", "1", "--polish-windows", "4",
                 "--polish-seq-len", "64", "--out", str(dest)]) == 0
    report = json.loads((dest / "report.json").read_text())
    assert report["polish_moves"] >= 1
    assert report["polish_loss_after"] < report["polish_loss_before"]
