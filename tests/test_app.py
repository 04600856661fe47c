"""The Streamlit app through ``streamlit.testing.v1.AppTest``: widgets drive every page on the
demo model; the plotly figures are read back from the chart protos and checked against numbers
computed with the library. The UI-agnostic helpers the app uses: ``test_studio_helpers.py``.

The page tests share one app session (module fixture) and run in page order, like a user:
model -> spectra -> compress (LLRC, stopped early) -> compare -> export.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import DEMO, ROOT, WIKI_TEST, WIKI_VALID
from llrc_core.errors import LLRCError

sys.path.insert(0, str(ROOT))   # the app's studio/ helpers
pytestmark = pytest.mark.skipif(not WIKI_TEST.exists(), reason="needs ../shared/data")


def figures(at) -> dict[str, dict]:
    """Every plotly chart on the page as its figure JSON, by widget key."""
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def no_errors(at):
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def wait_job(at, key, until=lambda job: not job.running, timeout=240):
    job = at.session_state[key]
    t0 = time.time()
    while not until(job):
        assert time.time() - t0 < timeout, f"{key} still {job.status} after {timeout} s"
        time.sleep(0.5)
    return job


def run_job(at, button, key):
    """Press a form's submit ``button``, wait for the job ``key`` it starts to finish, rerun
    the page; the finished job, after checking that it and the page raised nothing."""
    at.button(key=button).click().run()
    no_errors(at)
    job = wait_job(at, key)
    assert job.status == "done", job.error
    at.run()
    no_errors(at)
    return job


def settle(at, key, timeout=240):
    """Wait for the session's queued job ``key`` to end, then rerun the page (as the job's
    panel does in a browser)."""
    wait_job(at, key, timeout=timeout)
    at.run()


def base_checksum():
    from studio import common
    model = common.base_model(str(DEMO), "auto", "auto").model
    return sum(float(p.detach().double().abs().sum()) for p in model.parameters()), \
        {type(m).__name__ for m in model.modules()}


@pytest.fixture(scope="module")
def at(tmp_path_factory):
    from streamlit.testing.v1 import AppTest
    runs = tmp_path_factory.mktemp("compare-runs")   # the Compare page's disk cache
    os.environ["LLRC_STUDIO_RUNS"] = str(runs)
    os.environ["LLRC_STUDIO_WORKSPACE"] = str(tmp_path_factory.mktemp("workspace"))
    if "studio.common" in sys.modules:
        sys.modules["studio.common"].RUNS = runs
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    app.run()
    app.session_state["compare_test_runs"] = runs
    yield app
    os.environ.pop("LLRC_STUDIO_RUNS", None)
    os.environ.pop("LLRC_STUDIO_WORKSPACE", None)


def test_model_page_loads_demo_and_shows_parameters(at):
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == "22.74 M" and metrics["Target layers"] == "36"
    assert metrics["In target layers"] == "10.62 M"
    table = at.dataframe[0].value
    assert len(table) == 36 and set(table["module type"]) == {
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense"}
    assert at.session_state["windows"].shape == (16, 128)
    assert at.session_state["calib"]["source"] == str(WIKI_VALID)


def test_model_page_bad_folder_is_an_error_message(at):
    at.radio(key="model_source").set_value("Local folder")
    missing = os.path.join(os.environ["LLRC_STUDIO_WORKSPACE"], "no-such-model")
    at.text_input(key="model_path").set_value(missing)
    at.button(key="FormSubmitter:load-Load model").click().run()
    assert not at.exception
    assert "not found" in at.error[0].value and missing in at.error[0].value
    at.radio(key="model_source").set_value("Demo model (MiniLM-L6 decoder, WikiText-2)")
    at.button(key="FormSubmitter:load-Load model").click().run()
    no_errors(at)


def test_spectra_page_figures_match_the_decomposition(at):
    at.switch_page("pages/spectra.py").run()
    no_errors(at)
    assert not at.get("plotly_chart")           # the decomposition is a queued job first
    settle(at, "decompose_job")
    no_errors(at)
    figs = figures(at)
    assert set(figs) == {"fig_spectra", "fig_energy", "fig_heat", "fig_eff"}
    spec = figs["fig_spectra"]
    # Default: one module type (the first, query) in each of the 6 blocks, 384 values each.
    assert len(spec["data"]) == 6 and all(len(t["y"]) == 384 for t in spec["data"])
    assert spec["layout"]["yaxis"]["type"] == "log"
    assert "singular value" in spec["layout"]["yaxis"]["title"]["text"]
    energy = figs["fig_energy"]
    assert all(t["y"][-1] == pytest.approx(1.0) for t in energy["data"])
    assert energy["layout"]["shapes"][0]["y0"] == pytest.approx(0.9)   # the energy level line
    heat = figs["fig_heat"]["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 6 and len(heat["z"][0]) == 6
    table = at.dataframe[0].value
    q0 = table[table["layer"] == "bert.encoder.layer.0.attention.self.query"].iloc[0]
    assert heat["z"][0][0] == pytest.approx(q0["effective_rank"])
    assert 1 < q0["effective_rank"] < 384
    assert len(figs["fig_eff"]["data"][0]["y"]) == 36

    # Rank needed for 99 % energy: more than for 90 %, at most full rank.
    at.radio(key="spectra_heat_value").set_value(at.radio(key="spectra_heat_value").options[1])
    at.run()
    z90 = figures(at)["fig_heat"]["data"][0]["z"]
    at.slider(key="spectra_energy").set_value(0.99).run()
    at.radio(key="spectra_heat_value").set_value(at.radio(key="spectra_heat_value").options[1])
    at.run()
    no_errors(at)
    z99 = figures(at)["fig_heat"]["data"][0]["z"]
    flat90, flat99 = sum(z90, []), sum(z99, [])
    assert all(a <= b <= 384 for a, b in zip(flat90, flat99)) and sum(flat99) > sum(flat90)
    assert z90[0][0] == q0["rank_for_0.9"]
    assert len(at.get("download_button")) == 2


def test_compress_page_runs_llrc_live_and_stops(at):
    before = base_checksum()
    at.switch_page("pages/compress.py").run()
    no_errors(at)
    assert at.selectbox(key="compress_method").value == "llrc"
    # Invalid config: a message, no job.
    at.number_input(key="cfg_llrc_tau").set_value(0.0)
    at.button(key="FormSubmitter:compress_form-Start compression").click().run()
    assert not at.exception and "tau must be > 0" in at.error[0].value
    assert "compress_job" not in at.session_state
    at.number_input(key="cfg_llrc_tau").set_value(0.3)
    at.number_input(key="cfg_llrc_steps").set_value(400)
    at.number_input(key="cfg_llrc_mask_every").set_value(2)
    at.number_input(key="cfg_llrc_batch_size").set_value(2)
    at.number_input(key="n_eval").set_value(2)
    at.button(key="FormSubmitter:compress_form-Start compression").click().run()
    no_errors(at)
    job = wait_job(at, "compress_job", lambda j: len(j.events_since(0, "masks")) >= 2
                   or not j.running)
    assert job.running, job.error
    at.run()                              # a page refresh while it runs: live charts
    no_errors(at)
    figs = figures(at)
    assert {"fig_masks", "fig_loss", "fig_ratio", "fig_ranks"} <= set(figs)
    masks = figs["fig_masks"]["data"][0]
    assert masks["type"] == "heatmap" and len(masks["z"]) == 36 and len(masks["z"][0]) == 384
    assert all(0.0 <= v <= 1.0 for row in masks["z"] for v in row)
    loss = figs["fig_loss"]
    names = [t["name"] for t in loss["data"]]
    assert names == ["loss", "loss_compression", "loss_distill", "loss_tv", "alpha(t)"]
    assert loss["data"][-1]["yaxis"] == "y2" and "alpha" in loss["layout"]["yaxis2"]["title"]["text"]
    assert figs["fig_ratio"]["layout"]["shapes"][0]["y0"] == pytest.approx(0.8)
    at.button(key="stop").click().run()
    job = wait_job(at, "compress_job")
    assert job.status == "stopped", job.error
    done = job.latest("done")
    assert done["stopped"] is True and 0 < done["step"] < 400
    at.run()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Ratio (target layers)"]) <= 0.8 + 1e-9
    ppl_b, ppl_a = float(metrics["Perplexity before"]), float(metrics["Perplexity after"])
    assert 20 < ppl_b < 100 and ppl_a > ppl_b and math.isfinite(ppl_a)
    ranks = figures(at)["fig_ranks"]["data"][0]
    assert len(ranks["y"]) == 36 and ranks["y"] == list(job.result.plan.ranks().values())
    assert base_checksum() == before          # the shared base model was never touched


def test_compress_page_guards_the_refit_pass_memory(at, monkeypatch):
    """With the refit box ticked, the memory guard counts the refit pass (8 windows a
    batch, as the run does); a refusal is a message and no job starts."""
    from llrc_core import preflight
    seen = {}

    def refuse(*args, **kw):
        seen.update(kw)
        raise LLRCError("needs 99 GiB of memory in its refit phase")
    monkeypatch.setattr(preflight, "check_fits", refuse)
    at.switch_page("pages/compress.py").run()
    job = lambda: at.session_state["compress_job"] if "compress_job" in at.session_state \
        else None                                                        # noqa: E731
    before = job()
    at.checkbox(key="compress_refit").check()
    at.button(key="FormSubmitter:compress_form-Start compression").click().run()
    assert seen["refit_batch_size"] == 8
    assert "refit phase" in at.error[0].value and job() is before
    at.checkbox(key="compress_refit").uncheck()
    at.button(key="FormSubmitter:compress_form-Start compression").click().run()
    assert seen["refit_batch_size"] is None


def test_compare_page_grid_cache_and_accuracy(at):
    from llrc_core.zeroshot import evaluate_tasks
    from studio import common
    before = base_checksum()
    at.switch_page("pages/compare.py").run()
    no_errors(at)
    at.multiselect(key="cmp_methods").set_value(["uniform", "energy"])
    at.multiselect(key="cmp_ratios").set_value([0.8, 0.6])
    at.number_input(key="cmp_eval").set_value(2)
    at.multiselect(key="cmp_tasks").set_value(["piqa"])
    at.number_input(key="cmp_limit").set_value(8)
    run_job(at, "FormSubmitter:compare_form-Run comparison", "compare_job")
    figs = figures(at)
    bars = figs["fig_cmp_bars"]
    assert [t["name"] for t in bars["data"]] == ["uniform", "energy"]
    assert all(len(t["y"]) == 36 for t in bars["data"]) and bars["layout"]["barmode"] == "group"
    assert len(figs["fig_cmp_heat"]["data"][0]["z"]) == 2
    table = at.dataframe[0].value
    assert len(table) == 5 and table["method"].tolist()[0] == "dense"
    comp = table[table["method"] != "dense"]
    assert ((comp["achieved_ratio_linear"] - comp["target_ratio"]).abs() <= 0.005).all()
    dense_ppl = table["ppl"].iloc[0]
    ppl = {t["name"]: t for t in figs["fig_cmp_ppl"]["data"]}
    dense_line = ppl.pop("dense")                   # from the smallest ratio to 1 (dense)
    assert dense_line["x"] == [0.6, 1.0] and dense_line["y"] == [pytest.approx(dense_ppl)] * 2
    assert set(ppl) == {"uniform", "energy"}
    for t in ppl.values():   # trained weights: fewer parameters, higher perplexity
        assert t["x"] == [0.6, 0.8] and t["y"][0] > t["y"][1] > dense_ppl
    # Zero-shot accuracy: a bar per model (dense + the two methods at the shown ratio 0.8).
    acc = figs["fig_cmp_acc"]["data"]
    assert [t["name"] for t in acc] == ["dense", "uniform", "energy"]
    assert all(t["x"] == ["piqa"] and (8 * t["y"][0]) % 1 == 0 for t in acc)
    assert acc[0]["y"][0] == table["acc_piqa"].iloc[0]
    loaded = common.base_model(str(DEMO), "auto", "auto")
    assert acc[0]["y"][0] == evaluate_tasks(loaded.model, loaded.tokenizer, ["piqa"],
                                            limit=8)["piqa"]["acc"]
    out = common.RUNS
    assert out.is_relative_to(at.session_state["compare_test_runs"])
    folder = Path(at.session_state["compare_out"])
    assert len(list((folder / "cells").glob("*.json"))) == 5
    assert len(pd.read_csv(folder / "results.csv")) == 5
    assert base_checksum() == before          # the grid ran on a private copy
    # A grown grid (ratio 0.9 added) computes only the new cells; the others come from disk.
    at.multiselect(key="cmp_ratios").set_value([0.9, 0.8, 0.6])
    at.button(key="FormSubmitter:compare_form-Run comparison").click().run()
    job = wait_job(at, "compare_job")
    assert job.status == "done", job.error
    cached = [(e["row"]["method"], e["row"]["target_ratio"], e["cached"])
              for e in job.events_since(0, "cell")]
    assert sorted(c for c in cached if not c[2]) == [("energy", 0.9, False),
                                                      ("uniform", 0.9, False)]
    assert len(cached) == 7
    at.run()
    no_errors(at)
    again = at.dataframe[0].value.set_index(["method", "target_ratio"])
    for _, r in table.iterrows():
        assert again.loc[(r["method"], r["target_ratio"]), "seconds"] == r["seconds"]
    # Refit: every stored plan is evaluated again, refitted; none is selected again.
    at.checkbox(key="cmp_refit").check()
    at.button(key="FormSubmitter:compare_form-Run comparison").click().run()
    job = wait_job(at, "compare_job")
    assert job.status == "done", job.error
    cells = [e for e in job.events_since(0, "cell") if e["row"]["method"] != "dense"]
    assert len(cells) == 6 and not any(e["cached"] or e["reselected"] for e in cells)
    assert all(e["row"]["refit"] and e["row"]["refit_seconds"] > 0 for e in cells)
    # Windows spread over the test set: the stored plans evaluated again on other windows.
    at.checkbox(key="cmp_refit").uncheck()
    at.checkbox(key="cmp_spread").check()
    at.button(key="FormSubmitter:compare_form-Run comparison").click().run()
    job = wait_job(at, "compare_job")
    assert job.status == "done", job.error
    events = job.events_since(0, "cell")
    assert len(events) == 7 and all(e["row"]["eval_sample"] == "spread" for e in events)
    assert not any(e["cached"] or e["reselected"] for e in events
                   if e["row"]["method"] != "dense")
    spread_dense = next(e["row"]["ppl"] for e in events if e["row"]["method"] == "dense")
    assert spread_dense != pytest.approx(dense_ppl, rel=1e-3)   # the first and last windows


def test_compare_page_seeds_their_spread_and_their_vote(at):
    """Two seeds of LLRC and their vote: a row, a bar series and a line of its own; the
    seeds' spread chart holds the two seeds only."""
    at.switch_page("pages/compare.py").run()
    at.multiselect(key="cmp_methods").set_value(["llrc"])
    at.multiselect(key="cmp_ratios").set_value([0.8])
    at.checkbox(key="cmp_both").uncheck()
    at.checkbox(key="cmp_refit").uncheck()
    at.number_input(key="cmp_steps").set_value(3)
    at.number_input(key="cmp_seeds").set_value(2)
    at.checkbox(key="cmp_vote").check()
    at.multiselect(key="cmp_tasks").set_value([])
    at.button(key="FormSubmitter:compare_form-Run comparison").click().run()
    job = wait_job(at, "compare_job")
    assert job.status == "done", job.error
    at.run()
    no_errors(at)
    summary, table = at.dataframe[0].value, at.dataframe[1].value
    assert table["method"].tolist() == ["dense", "llrc", "llrc", "llrc"]
    assert table["seed"].tolist()[1:3] == [0, 1] and table["vote"].tolist()[3] == "0,1"
    assert ((table["achieved_ratio_linear"][1:] - 0.8).abs() <= 0.005).all()
    assert summary["seeds"].tolist() == [2, 1]
    figs = figures(at)
    assert [t["name"] for t in figs["fig_cmp_bars"]["data"]] == ["llrc any-k",
                                                                 "llrc any-k vote 0,1"]
    spread = figs["fig_spread_0"]["data"][0]
    assert spread["name"] == "llrc any-k" and len(spread["x"]) == 36
    assert "fig_spread_1" not in figs                       # one plan: no spread
    lines = {t["name"]: t["y"] for t in figs["fig_cmp_ppl"]["data"]}
    assert lines["llrc any-k vote 0,1"] == [pytest.approx(table["ppl"].iloc[3])]


def test_finished_compress_job_reaches_export_without_the_compress_page():
    """A user who leaves the Compress page the moment a job ends interrupts that page's
    finalising run; the result must still be offered for export."""
    from types import SimpleNamespace
    from streamlit.testing.v1 import AppTest
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    app.run()
    result = SimpleNamespace(plan=None)
    app.session_state["compress_job"] = SimpleNamespace(running=False, result=result)
    app.session_state["compress_label"] = "llrc any-k 0.80 linear (asvd)"
    app.switch_page("pages/export.py").run()
    no_errors(app)
    assert app.selectbox(key="export_choice").options == ["llrc any-k 0.80 linear (asvd)"]


def test_export_page_saves_zips_and_reloads(at, tmp_path):
    at.switch_page("pages/export.py").run()
    no_errors(at)
    label = at.session_state["compress_label"]
    assert at.selectbox(key="export_choice").value == label
    for bad in (str(tmp_path / "exported"), "../exported"):     # only a name, in the workspace
        at.text_input(key="export_folder").set_value(bad)
        at.button(key="FormSubmitter:export_form-Save to folder").click().run()
        assert not at.exception and "not a plain folder name" in at.error[0].value
    assert not (tmp_path / "exported").exists()
    at.text_input(key="export_folder").set_value("exported")
    at.button(key="FormSubmitter:export_form-Save to folder").click().run()
    settle(at, "export_job")
    no_errors(at)
    out = Path(os.environ["LLRC_STUDIO_WORKSPACE"], "sessions", at.session_state["session_id"],
               "exports", "exported")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "rank_plan.json", "rank_plan.csv",
            "README.md"} <= names
    plan = json.loads((out / "rank_plan.json").read_text())
    assert plan["method"] == "llrc" and plan["selection"] == "any-k"   # LLRC's default
    assert "dl_zip" in [b.key for b in at.get("download_button")]   # built on click by:
    from llrc_core.workflow import zip_folder
    with zipfile.ZipFile(io.BytesIO(zip_folder(out))) as zf:
        assert {f"exported/{n}" for n in names} == set(zf.namelist())
    at.button(key="reload_check").click().run()
    settle(at, "check_job")
    no_errors(at)
    diff = float(at.metric[0].value)
    assert diff <= 1e-5 and "same outputs" in at.success[-1].value
    # Saving again into the now non-empty folder without "replace": a message, files intact.
    at.button(key="FormSubmitter:export_form-Save to folder").click().run()
    assert not at.exception and "already holds an export" in at.error[0].value
    assert {p.name for p in out.iterdir()} == names
    # "Replace" works on a folder the studio wrote, and never on one it did not write.
    foreign = out.parent / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("not the studio's")
    at.checkbox(key="export_force").check()
    at.text_input(key="export_folder").set_value("foreign")
    at.button(key="FormSubmitter:export_form-Save to folder").click().run()
    assert not at.exception and "not written by this studio" in at.error[0].value
    assert [p.name for p in foreign.iterdir()] == ["data.txt"]
    at.text_input(key="export_folder").set_value("exported")
    at.button(key="FormSubmitter:export_form-Save to folder").click().run()
    settle(at, "export_job")
    no_errors(at)
    assert {p.name for p in out.iterdir()} == names


def test_sessions_do_not_share_jobs_or_results(at):
    from streamlit.testing.v1 import AppTest
    other = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    other.run()
    other.switch_page("pages/export.py").run()
    no_errors(other)
    assert "compress_job" not in other.session_state and not other.session_state["results"]
    assert "Nothing to export yet" in other.info[0].value


def small_polish(monkeypatch):
    """The pages' ``PolishConfig`` made small (4 windows of 64 tokens, 2 pairs), for time."""
    import dataclasses
    from llrc_core import polish

    @dataclasses.dataclass
    class Small(polish.PolishConfig):
        windows: int = 4
        seq_len: int = 64
        pairs: int = 2
    monkeypatch.setattr(polish, "PolishConfig", Small)


def polished_uniform_cell(at, ratio: float, decomposition: str) -> dict:
    """Run a one-cell Compare grid (uniform at ``ratio``, one polish round, no refit, vote,
    spread or tasks) and return its row."""
    at.switch_page("pages/compare.py").run()
    no_errors(at)
    at.multiselect(key="cmp_methods").set_value(["uniform"])
    at.multiselect(key="cmp_ratios").set_value([ratio])
    at.selectbox(key="cmp_decomp").set_value(decomposition)
    for box in ("cmp_refit", "cmp_vote", "cmp_spread"):
        at.checkbox(key=box).uncheck()
    at.number_input(key="cmp_seeds").set_value(1)
    at.number_input(key="cmp_eval").set_value(2)
    at.multiselect(key="cmp_tasks").set_value([])
    at.number_input(key="cmp_polish").set_value(1)
    at.button(key="FormSubmitter:compare_form-Run comparison").click().run()
    job = wait_job(at, "compare_job")
    assert job.status == "done", job.error
    at.run()
    no_errors(at)
    return next(e["row"] for e in job.events_since(0, "cell")
                if e["row"]["method"] == "uniform")


def test_compress_and_compare_pages_polish_a_plan(at, monkeypatch):
    """Polish rounds on the Compress page: the job polishes the selected plan on windows
    spread over the session's calibration text and the page reports its moves; the Compare
    page polishes its cells on the same windows. (A small polish config, for time.)"""
    small_polish(monkeypatch)
    at.switch_page("pages/compress.py").run()
    at.selectbox(key="compress_method").set_value("uniform").run()
    at.selectbox(key="compress_decomp_uniform").set_value("whiten").run()
    at.slider(key="cfg_uniform_ratio").set_value(0.6)
    at.number_input(key="n_eval").set_value(2)
    at.number_input(key="compress_polish").set_value(1)
    job = run_job(at, "FormSubmitter:compress_form-Start compression", "compress_job")
    report, plan = job.result.report, job.result.plan
    assert report["polish"]["rounds"] == 1 and report["polish_moves"] >= 1
    assert report["polish_loss_after"] < report["polish_loss_before"]
    assert plan.meta["polish"]["window_shape"] == [4, 64]        # spread over the text
    assert abs(plan.ratio("linear") - 0.6) <= 0.005
    assert len(set(plan.ranks().values())) > 2                   # no longer uniform
    assert any(c.value.startswith(f"Polished: {report['polish_moves']} moves")
               for c in at.caption)

    row = polished_uniform_cell(at, 0.6, "whiten")
    assert row["polish"]["rounds"] == 1 and row["polish_moves"] >= 1
    assert row["ranks"] == plan.ranks()          # the same windows, the same moves


def test_compress_page_refits_on_fresh_windows(at):
    """Refit windows with the refit off: a message, and no job starts. With the refit on,
    the run is refitted on that many fresh windows of the session's calibration text."""
    submit = "FormSubmitter:compress_form-Start compression"
    at.switch_page("pages/compress.py").run()
    method = at.selectbox(key="compress_method").value
    at.selectbox(key="compress_method").set_value("uniform").run()
    before = at.session_state["compress_job"] if "compress_job" in at.session_state else None
    at.number_input(key="compress_refit_windows").set_value(12)
    at.number_input(key="n_eval").set_value(0)
    at.button(key=submit).click().run()
    assert "refit is off" in at.error[0].value
    assert (at.session_state["compress_job"] if "compress_job" in at.session_state
            else None) is before
    at.checkbox(key="compress_refit").check()
    report = run_job(at, submit, "compress_job").result.report
    assert report["refit"] is True and report["refit_windows"] == 12
    assert at.session_state["windows"].shape[0] != 12          # not the calibration windows
    at.checkbox(key="compress_refit").uncheck()
    at.number_input(key="compress_refit_windows").set_value(0)
    at.selectbox(key="compress_method").set_value(method).run()
