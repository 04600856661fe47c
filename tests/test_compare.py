"""The comparison runner: grid axes, a real run on the demo model, resuming from cached
cells, failing methods recorded, MiniLM embedding fidelity."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import DEMO, WIKI_TEST
from llrc_core import compare
from llrc_core.compare import CompareConfig, grid, method_axes, run_compare
from llrc_core.errors import Stopped
from llrc_core.selectors import SELECTORS, Method
from llrc_core.selectors.uniform import select_uniform

SMALL = dict(n_calib=2, seq_len=64, eval_seq_len=64, max_eval_windows=2, fidelity_lines=16)


@pytest.mark.parametrize("decompositions,method,expected", [
    (("auto",), "svdllm", [("whiten", "top-k")]),
    (("asvd",), "svdllm", []),                       # whitening only: skipped
    (("auto",), "strs", [("asvd", "top-k")]),
    (("auto",), "drank", [("whiten", "top-k")]),
    (("auto",), "ara", [("whiten", "top-k")]),         # the paper's whitened factors
    (("auto",), "ars", [("asvd", "top-k"), ("asvd", "any-k")]),   # ARS declares any-k
    (("auto",), "llrc", [("whiten", "top-k"), ("whiten", "any-k")]),  # best measured
    (("svd", "asvd"), "uniform", [("svd", "top-k"), ("asvd", "top-k")]),
])
def test_method_axes(decompositions, method, expected):
    cfg = CompareConfig(methods=(method,), decompositions=decompositions)
    assert method_axes(method, cfg) == expected


def test_any_k_only_for_methods_that_support_it(monkeypatch):
    monkeypatch.setitem(SELECTORS, "fake_anyk", Method("fake_anyk", select_uniform,
                                                       selections=("top-k", "any-k")))
    cfg = CompareConfig(methods=("fake_anyk", "uniform"), ratios=(0.8, 0.6))
    cells = grid(cfg)
    assert {(c["method"], c["selection"]) for c in cells} == {
        ("fake_anyk", "top-k"), ("fake_anyk", "any-k"), ("uniform", "top-k")}
    assert len(cells) == 6


@pytest.mark.parametrize("bad", [{"ratios": (1.5,)}, {"selections": ("some-k",)},
                                 {"decompositions": ("qr",)}, {"scope": "all"}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        CompareConfig(**bad)


def test_config_round_trip():
    cfg = CompareConfig(methods=("uniform",), options={"strs": {"candidates": [0.5]}})
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg


def test_demo_grid_resumes_and_writes_tidy_results(tmp_path, monkeypatch):
    def boom(ctx, cfg):
        raise RuntimeError("broken method")
    monkeypatch.setitem(SELECTORS, "broken", Method("broken", boom))
    cfg = CompareConfig(model=str(DEMO), methods=("uniform", "svdllm", "broken"),
                        ratios=(0.8, 0.6), **SMALL)
    df = run_compare(cfg, tmp_path, log=lambda _: None)
    assert len(df) == 1 + 2 * 3
    ok = df[df["error"].isna() & (df["method"] != "dense")]
    assert len(ok) == 4
    for _, row in ok.iterrows():
        assert abs(row["achieved_ratio_linear"] - row["target_ratio"]) <= 0.005
        assert row["achieved_ratio_model"] > row["achieved_ratio_linear"]
        assert len(row["ranks"]) == 36
    dense = df[df["method"] == "dense"]["ppl"].item()
    ppl = ok.set_index(["method", "target_ratio"])["ppl"]
    assert dense < ppl[("svdllm", 0.8)] < ppl[("svdllm", 0.6)]
    assert ppl[("svdllm", 0.8)] < ppl[("uniform", 0.8)]        # whitening beats ASVD here
    assert df[df["method"] == "broken"]["error"].str.contains("broken method").all()

    csv = pd.read_csv(tmp_path / "results.csv")
    for col in ("method", "decomposition", "selection", "target_ratio", "achieved_ratio_linear",
                "achieved_ratio_model", "ppl", "seconds", "ranks"):
        assert col in csv.columns
    assert json.loads(csv["ranks"].iloc[1])                     # ranks per layer as JSON
    assert len(json.loads((tmp_path / "results.json").read_text())) == 7
    for fig in ("ppl_vs_ratio.html", "ranks_heatmap.html"):
        assert (tmp_path / fig).stat().st_size > 10_000

    # Second run: every good cell is read back; nothing loads the model.
    class NoSession:
        def __init__(self, *a, **k):
            raise AssertionError("the model was loaded although every cell is cached")
    monkeypatch.delitem(SELECTORS, "broken")
    real_session = compare.Session
    monkeypatch.setattr(compare, "Session", NoSession)
    again = run_compare(CompareConfig.from_dict({**cfg.to_dict(),
                                                 "methods": ["uniform", "svdllm"]}),
                        tmp_path, log=lambda _: None)
    assert again["ppl"].tolist() == df[df["method"] != "broken"]["ppl"].tolist()

    # Only the evaluation changes (one window, not two): the stored plans are re-applied and
    # re-evaluated; no selector runs.
    monkeypatch.setattr(compare, "Session", real_session)

    def no_select(ctx, cfg):
        raise AssertionError("a plan was selected again although only the evaluation changed")

    def no_select_whiten(ctx, cfg):
        no_select(ctx, cfg)
    monkeypatch.setitem(SELECTORS, "uniform", Method("uniform", no_select))
    monkeypatch.setitem(SELECTORS, "svdllm", Method("svdllm", no_select_whiten, preferred="whiten"))
    one = run_compare(CompareConfig.from_dict({**cfg.to_dict(), "methods": ["uniform", "svdllm"],
                                               "max_eval_windows": 1}),
                      tmp_path, log=lambda _: None)
    assert one["error"].isna().all()
    assert one["ranks"].tolist() == again["ranks"].tolist()
    assert one["seconds"].tolist() == again["seconds"].tolist()
    assert all(a != b for a, b in zip(one["ppl"], again["ppl"]))   # a different window count

    # Refitting the output factors is a new evaluation of the stored plans too.
    def fit_cfg(c: CompareConfig) -> dict:
        return {**c.to_dict(), "methods": ["uniform", "svdllm"], "max_eval_windows": 1,
                "refit": True}
    fit = run_compare(CompareConfig.from_dict(fit_cfg(cfg)), tmp_path, log=lambda _: None)
    low = fit["method"] != "dense"
    assert fit["error"].isna().all() and fit[low]["refit"].tolist() == [True] * 4
    assert (fit[low]["refit_seconds"] > 0).all()
    assert fit["seconds"].tolist() == one["seconds"].tolist()
    assert fit["ppl"][~low].tolist() == one["ppl"][~low].tolist()       # dense: unchanged
    assert all(a != b for a, b in zip(fit["ppl"][low], one["ppl"][low]))

    # Refitting on fresh windows of the calibration text: again only a new evaluation.
    fresh = run_compare(CompareConfig.from_dict({**fit_cfg(cfg), "refit_windows": 6}),
                        tmp_path, log=lambda _: None)
    assert fresh["error"].isna().all() and fresh[low]["refit_windows"].tolist() == [6] * 4
    assert fit[low]["refit_windows"].tolist() == [cfg.n_calib] * 4
    assert fresh["seconds"].tolist() == one["seconds"].tolist()
    assert fresh["ppl"][~low].tolist() == one["ppl"][~low].tolist()
    assert all(a != b for a, b in zip(fresh["ppl"][low], fit["ppl"][low]))

    # Windows spread over the text instead of its first ones: a new evaluation of the stored
    # plans as well; a grid on the first windows keeps its cache (the field is left out of
    # its fingerprint, as before the field existed).
    spread_cfg = CompareConfig.from_dict({**cfg.to_dict(), "methods": ["uniform", "svdllm"],
                                          "eval_sample": "spread"})
    assert compare.select_fingerprint(spread_cfg, "svdllm") == \
        compare.select_fingerprint(cfg, "svdllm")
    assert compare.fingerprint(spread_cfg, "svdllm") != compare.fingerprint(cfg, "svdllm")
    spread = run_compare(spread_cfg, tmp_path, log=lambda _: None)
    assert spread["error"].isna().all() and set(spread["eval_sample"]) == {"spread"}
    assert spread["seconds"].tolist() == again["seconds"].tolist()
    assert all(a != b for a, b in zip(spread["ppl"], again["ppl"]))
    with pytest.raises(ValueError, match="eval_sample"):
        CompareConfig(eval_sample="last")


def test_grid_events_stop_and_resume(tmp_path, monkeypatch):
    """The app's use: a session made on demand, progress events, a stop inside a cell (not
    written), then a resumed grid that computes only what is missing."""
    stop = {"now": False}

    def stopper(ctx, cfg):                   # a selector the user stops while it runs
        stop["now"] = True
        return select_uniform(ctx, cfg)
    monkeypatch.setitem(SELECTORS, "stopper", Method("stopper", stopper))
    cfg = CompareConfig(model=str(DEMO), methods=("uniform", "stopper", "energy"),
                        ratios=(0.8,), **SMALL)
    made, events = [], []

    def make():
        made.append(1)
        return compare.Session(cfg, lambda _: None)
    rows = compare.run_cells(cfg, tmp_path, lambda _: None, make_session=make,
                             emit=events.append, should_stop=lambda: stop["now"])
    assert [r["method"] for r in rows] == ["dense", "uniform"] and made == [1]
    assert sorted(p.stem for p in (tmp_path / "cells").glob("*.json")) == [
        "dense__-__-__1", "uniform__asvd__top-k__0.8"]       # the stopped cell is not kept
    assert [(e["done"], e["total"]) for e in events if e["type"] == "grid"] == [
        (0, 4), (1, 4), (2, 4), (2, 4)]
    events.clear()
    stop["now"] = False
    monkeypatch.setitem(SELECTORS, "stopper", Method("stopper", select_uniform))
    rows = compare.run_cells(cfg, tmp_path, lambda _: None, make_session=make,
                             emit=events.append)
    assert [(e["row"]["method"], e["cached"]) for e in events if e["type"] == "cell"] == [
        ("dense", True), ("uniform", True), ("stopper", False), ("energy", False)]
    assert made == [1, 1] and len(rows) == 4
    assert rows[2]["ranks"] == rows[1]["ranks"] and rows[2]["plan"]["layers"]

    # A selector with no plan to give raises the shared ``Stopped``: the grid ends there,
    # with no error row and no cell written for it (a later run redoes it).
    def no_plan(ctx, cfg):
        raise Stopped("stopped before any plan")
    monkeypatch.setitem(SELECTORS, "noplan", Method("noplan", no_plan))
    more = CompareConfig.from_dict({**cfg.to_dict(), "methods": ["uniform", "noplan", "energy"]})
    rows = compare.run_cells(more, tmp_path, lambda _: None, make_session=make)
    assert [r["method"] for r in rows] == ["dense", "uniform"]
    assert not any(r.get("error") for r in rows)
    assert not list((tmp_path / "cells").glob("noplan__*"))


def test_fidelity_helpers():
    from llrc_core.fidelity import mean_cosine, wiki_lines
    a = torch.randn(5, 8)
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(a, -a) == pytest.approx(-1.0)
    lines = wiki_lines(WIKI_TEST, 10)
    assert len(lines) == 10 and not any(ln.startswith("=") for ln in lines)


def test_minilm_fidelity_through_compare(tmp_path):
    cfg = CompareConfig(model="minilm", methods=("svdllm",), ratios=(0.8,), **SMALL)
    run_compare(cfg, tmp_path, log=lambda _: None)
    # Resumed with a new ratio: dense and 0.8 come from disk, 0.4 is computed in a new
    # session, whose reference embeddings must still come from the dense model.
    cfg = CompareConfig.from_dict({**cfg.to_dict(), "ratios": [0.8, 0.4]})
    df = run_compare(cfg, tmp_path, log=lambda _: None)
    fid = df.set_index("target_ratio")["fidelity"]
    assert fid[1.0] == pytest.approx(1.0, abs=1e-6)             # dense against itself
    assert 0.2 < fid[0.4] < fid[0.8] < 0.999 and fid[0.8] > 0.5   # 128 calibration tokens
    assert df["ppl"].isna().all()


def test_seed_axis_runs_learned_cells_per_seed_and_caches_each(tmp_path, monkeypatch):
    """``seeds``: one cell per seed for a method that trains, one for the rest; each seed is
    cached on its own (a grid grown by a seed runs only that seed); summary.csv holds the
    mean and sample sd over seeds, and the figure draws them as error bars."""
    import dataclasses
    from llrc_core import report
    cfg = CompareConfig(model=str(DEMO), methods=("llrc", "uniform"), ratios=(0.8,),
                        selections=("any-k",), decompositions=("asvd",), seeds=(0,),
                        options={"llrc": {"steps": 4}}, **SMALL)
    assert [compare.cell_id(c) for c in grid(cfg)] == [
        "llrc__asvd__any-k__0.8__seed0", "uniform__asvd__top-k__0.8"]
    run_compare(cfg, tmp_path, log=lambda _: None)

    calls = []
    spec = SELECTORS["llrc"]

    def counted(ctx, c):
        calls.append(c.seed)
        return spec.select(ctx, c)
    monkeypatch.setitem(SELECTORS, "llrc", dataclasses.replace(spec, select=counted))
    more = CompareConfig.from_dict({**cfg.to_dict(), "seeds": "0,1,2"})
    df = run_compare(more, tmp_path, log=lambda _: None)
    assert calls == [1, 2]                            # seed 0 and uniform came from disk
    learned = df[df["method"] == "llrc"].sort_values("seed")
    assert learned["seed"].tolist() == [0, 1, 2]
    assert df[df["method"] == "uniform"]["seed"].isna().all()
    plans = {tuple(sorted(r.items())) for r in learned["ranks"]}
    assert len(plans) > 1                             # the seed reaches the selector

    summary = pd.read_csv(tmp_path / "summary.csv")
    row = summary[summary["method"] == "llrc"].iloc[0]
    assert row["seeds"] == 3
    assert row["ppl_mean"] == pytest.approx(learned["ppl"].mean())
    assert row["ppl_sd"] == pytest.approx(learned["ppl"].std(ddof=1))
    assert row["ppl_sd"] > 0
    uni = summary[summary["method"] == "uniform"].iloc[0]
    assert uni["seeds"] == 1 and pd.isna(uni["ppl_sd"])
    fig, _ = report.build_figures(df, json.loads((tmp_path / "results.json").read_text()))
    bars = {t.name: list(t.error_y.array) for t in fig.data if t.name != "dense"}
    assert bars["llrc any-k (asvd)"] == pytest.approx([row["ppl_sd"]])
    assert bars["uniform (asvd)"] == [0.0]

    s = report.summary(df)
    assert report.beats(s, "llrc any-k (asvd)", "uniform (asvd)", 0.8) is None  # 1 seed
    assert report.beats(s, "llrc any-k (asvd)", "llrc any-k (asvd)", 0.8) is False

    # ``vote``: one more cell per learned cell, the vote of its seeds' stored plans; nothing
    # is selected again, the seeds' mean is untouched, and the vote is its own row and line
    voting = CompareConfig.from_dict({**more.to_dict(), "vote": True})
    assert compare.cell_id(grid(voting)[3]) == "llrc__asvd__any-k__0.8__vote0-1-2"
    df = run_compare(voting, tmp_path, log=lambda _: None)
    assert calls == [1, 2]
    v = df[df["vote"].notna()].iloc[0]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert v["seconds"] == pytest.approx(learned["seconds"].sum())
    assert abs(v["achieved_ratio_linear"] - 0.8) < 0.005
    from llrc_core.plan import RankPlan
    from llrc_core.vote import vote_plans
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    expected = vote_plans([RankPlan.from_dict(cells[f"llrc__asvd__any-k__0.8__seed{i}"]["plan"])
                           for i in range(3)])
    assert v["ranks"] == expected.ranks()
    summary = report.summary(df)
    assert summary[summary["method"] == "llrc"]["seeds"].tolist() == [3, 1]
    assert summary.iloc[1]["ppl_mean"] == pytest.approx(row["ppl_mean"])   # seeds only
    fig, _ = report.build_figures(df, rows)
    assert {t.name for t in fig.data} >= {"llrc any-k (asvd)", "llrc any-k vote 0,1,2 (asvd)"}


@pytest.mark.parametrize("bad", ["", "0,a"])
def test_config_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        CompareConfig(seeds=bad)


def test_a_vote_with_a_failed_seed_is_an_error_naming_the_seed():
    cell = {"method": "llrc", "decomposition": "whiten", "selection": "any-k",
            "target_ratio": 0.6, "vote": "0,1"}
    ok = {**{k: v for k, v in cell.items() if k != "vote"}, "seed": 0, "seconds": 1.0,
          "plan": {"version": 1, "total_params": 10, "layers": {"l": {"shape": [4, 4],
                                                                       "kept": [0]}}}}
    failed = {**ok, "seed": 1, "error": "RuntimeError: NaN loss", "plan": None}
    with pytest.raises(ValueError, match=r"seed\(s\) \[1\] failed"):
        compare.voted(cell, [ok, failed])
    other_ratio = {**ok, "seed": 1, "target_ratio": 0.8}
    with pytest.raises(ValueError, match=r"\[1\]"):
        compare.voted(cell, [ok, other_ratio])
    assert compare.voted(cell, [ok, {**ok, "seed": 1}])["seconds"] == 2.0


def test_polish_is_a_new_selection_left_out_of_fingerprints_when_off(monkeypatch):
    """Polishing changes the plans, so it enters the plan's fingerprint; at 0 (off) it is
    left out, so grids cached before the field existed keep their cells."""
    cfg = CompareConfig(methods=("uniform",))
    pol = CompareConfig(methods=("uniform",), polish=3)
    assert compare.select_fingerprint(pol, "uniform") != compare.select_fingerprint(cfg, "uniform")
    before = compare.select_fingerprint(cfg, "uniform")
    monkeypatch.setattr(compare, "LATER_FIELDS", {"refit": False, "eval_sample": "first"})
    assert compare.select_fingerprint(cfg, "uniform") != before     # counted, it would differ
    with pytest.raises(ValueError, match="polish"):
        CompareConfig(polish=-1)
    # The dense cell has no plan to polish or refit: its row stays cached.
    fit = CompareConfig(methods=("uniform",), refit=True)
    monkeypatch.undo()
    assert compare.fingerprint(pol, "dense") == compare.fingerprint(cfg, "dense") == \
        compare.fingerprint(fit, "dense")
    assert compare.fingerprint(fit, "uniform") != compare.fingerprint(cfg, "uniform")
    fresh = CompareConfig(methods=("uniform",), refit=True, refit_windows=64)
    assert compare.fingerprint(fresh, "uniform") != compare.fingerprint(fit, "uniform")
    assert compare.select_fingerprint(fresh, "uniform") == compare.select_fingerprint(
        fit, "uniform") and compare.fingerprint(fresh, "dense") == compare.fingerprint(
        cfg, "dense")
    for bad in ({"refit_windows": 64}, {"refit": True, "refit_windows": -1}):
        with pytest.raises(ValueError, match="refit_windows.*0 or more, and with refit on"):
            CompareConfig(**bad)
