"""The Playground: ``llrc_core.generate`` against manual forward passes (same seed, same tokens;
probabilities and prompt perplexity equal to what a plain forward gives), its figure, and the
page in AppTest and in headless Chromium (dense next to compressed models: identical weights
and seed give identical text, a real compression changes the numbers)."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, ROOT, WIKI_TEST, tiny_model, tiny_tokenizer
from llrc_core.generate import SamplingConfig, generate, generate_each, prompt_ids

sys.path.insert(0, str(ROOT))   # the app's studio/ helpers
PROMPT = "The history of the city"
SAMPLE = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95,
                        top_k=50, seed=0)


@pytest.fixture(scope="module")
def dense():
    """The demo model (float32, CPU), shared by the core tests: never changed by them."""
    from llrc_core import load_model
    return load_model(DEMO, device="cpu", dtype="float32")


def checksum(model) -> float:
    return sum(float(p.detach().double().abs().sum()) for p in model.parameters())


@torch.no_grad()
def manual_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of the token after ``ids``: one full forward pass, no cache."""
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


# --- the core ------------------------------------------------------------------------------------
def test_same_seed_same_tokens_and_no_global_rng(dense):
    before = checksum(dense.model)
    rng = torch.random.get_rng_state()
    a = generate(dense.model, dense.tokenizer, PROMPT, SAMPLE)
    torch.manual_seed(1234)                      # the global RNG plays no part
    b = generate(dense.model, dense.tokenizer, PROMPT, SAMPLE)
    other = generate(dense.model, dense.tokenizer, PROMPT,
                     SamplingConfig(**{**SAMPLE.to_dict(), "seed": 1}))
    assert a.new_ids == b.new_ids and a.text == b.text and len(a.new_ids) == 12
    assert other.new_ids != a.new_ids
    expected = torch.random.get_rng_state()
    generate(dense.model, dense.tokenizer, PROMPT, SAMPLE)
    assert torch.equal(torch.random.get_rng_state(), expected)     # not drawn from
    torch.random.set_rng_state(rng)
    assert checksum(dense.model) == before          # generation never changes the model


def test_greedy_and_top_k_1_equal_a_manual_argmax_loop(dense):
    greedy = generate(dense.model, dense.tokenizer, PROMPT, SamplingConfig(max_new_tokens=8))
    ids = prompt_ids(dense.tokenizer, PROMPT)[0].tolist()
    for _ in range(8):
        ids.append(int(manual_logits(dense.model, ids).argmax()))
    assert greedy.new_ids == ids[-8:]
    top1 = generate(dense.model, dense.tokenizer, PROMPT,
                    SamplingConfig(max_new_tokens=8, do_sample=True, top_k=1, seed=7))
    assert top1.new_ids == greedy.new_ids


def test_probabilities_match_a_manual_forward(dense):
    g = generate(dense.model, dense.tokenizer, PROMPT, SAMPLE)
    assert [s.step for s in g.steps] == [1, 2, 3, 4] and all(len(s.probs) == 5 for s in g.steps)
    ids = list(g.prompt_ids)
    for s in g.steps:
        probs = torch.softmax(manual_logits(dense.model, ids), -1)
        top = probs.topk(5)
        assert s.ids == top.indices.tolist()
        assert s.probs == pytest.approx(top.values.tolist(), abs=1e-5)
        assert s.probs == sorted(s.probs, reverse=True) and 0 < sum(s.probs) <= 1 + 1e-6
        assert s.chosen_id == g.new_ids[s.step - 1]
        assert s.chosen_prob == pytest.approx(float(probs[s.chosen_id]), abs=1e-5)
        assert s.chosen == dense.tokenizer.decode([s.chosen_id])
        ids.append(s.chosen_id)


def test_prompt_perplexity_is_exp_of_the_manual_loss(dense):
    g = generate(dense.model, dense.tokenizer, PROMPT, SamplingConfig(max_new_tokens=1))
    ids = torch.tensor([dense.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    assert g.prompt_ids == ids[0].tolist()             # BERT: no [CLS] ... [SEP], no BOS
    with torch.no_grad():
        logits = dense.model(input_ids=ids).logits[0]                              # (T, V)
    loss = F.cross_entropy(logits[:-1].float(), ids[0, 1:])
    assert g.prompt_ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert 5 < g.prompt_ppl < 5000
    one = generate(dense.model, dense.tokenizer, "The", SamplingConfig(max_new_tokens=1))
    assert len(one.prompt_ids) == 1 and one.prompt_ppl is None      # nothing to predict


def test_streamed_text_timing_and_stop(dense):
    pieces = []
    g = generate(dense.model, dense.tokenizer, PROMPT, SAMPLE, on_text=pieces.append)
    assert "".join(pieces) == g.text and len(pieces) >= 3
    assert g.tokens_per_s == pytest.approx(12 / g.seconds)
    assert 0 < g.first_token_s < g.seconds and g.decode_tokens_per_s > 0
    calls = []
    stopped = generate(dense.model, dense.tokenizer, PROMPT, SAMPLE,
                       should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert stopped.stopped and len(stopped.new_ids) == 4
    assert stopped.new_ids == g.new_ids[:4]                # same seed: the same first tokens


def test_identical_weights_same_text_and_events(dense):
    twin = copy.deepcopy(dense.model)
    events = []
    out = generate_each({"dense": (dense.model, dense.tokenizer),
                         "twin": (twin, dense.tokenizer)}, PROMPT, SAMPLE, events.append)
    assert out["dense"].new_ids == out["twin"].new_ids
    assert out["dense"].prompt_ppl == out["twin"].prompt_ppl
    assert [e["type"] for e in events if e["type"] != "text"] == [
        "start", "generation", "start", "generation"]
    assert events[0]["params"] == sum(p.numel() for p in dense.model.parameters())
    text = "".join(e["text"] for e in events if e["type"] == "text" and e["label"] == "twin")
    assert text == out["twin"].text == events[-1]["text"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_other_architectures_generate_with_the_cache(arch):
    """KV-cached generation equals the manual argmax loop on tiny Llama and GPT-2 models."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    g = generate(model, tok, "the game was", SamplingConfig(max_new_tokens=6))
    ids = list(g.prompt_ids)
    for _ in range(6):
        ids.append(int(manual_logits(model, ids).argmax()))
    assert g.new_ids == ids[-6:]


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be at least 1"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k must be >= 0"),
])
def test_sampling_config_is_validated(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingConfig(**{field: value})
    assert SamplingConfig.from_dict(SAMPLE.to_dict()) == SAMPLE
    assert json.loads(json.dumps(SAMPLE.to_dict())) == SAMPLE.to_dict()


def test_prompt_and_length_errors(dense):
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(dense.model, dense.tokenizer, "   ", SAMPLE)
    with pytest.raises(ValueError, match="exceed the model's context of 512"):
        generate(dense.model, dense.tokenizer, PROMPT, SamplingConfig(max_new_tokens=510))
    from transformers import BertConfig, BertModel
    encoder = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="BertModel cannot generate text"):
        generate(encoder, dense.tokenizer, PROMPT, SAMPLE)


def test_next_token_probs_figure():
    from llrc_core.figures import next_token_probs
    steps = [dict(step=1, tokens=["a", "b", "c"], ids=[1, 2, 3], probs=[0.5, 0.2, 0.1],
                  chosen="b", chosen_id=2, chosen_prob=0.2),
             dict(step=2, tokens=["d", "e", "f"], ids=[4, 5, 6], probs=[0.7, 0.1, 0.05],
                  chosen="z", chosen_id=9, chosen_prob=0.01)]
    fig = json.loads(next_token_probs(steps).to_json())
    bars = fig["data"]
    assert [t["name"] for t in bars] == ["rank 1", "rank 2", "rank 3", "other"]
    assert bars[0]["y"] == ["1: 'b'", "2: 'z'"] and bars[0]["x"] == [0.5, 0.7]
    assert bars[-1]["x"] == pytest.approx([0.2, 0.15])                 # 1 - the top mass
    assert bars[1]["marker"]["line"]["width"] == [3, 0]               # the chosen 'b' outlined
    assert all(t["marker"]["line"]["width"] == [0, 0] for t in bars[2:3])
    assert fig["layout"]["barmode"] == "stack"
    assert "probability" in fig["layout"]["xaxis"]["title"]["text"]


# --- the page (AppTest) --------------------------------------------------------------------------
def no_errors(at):
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def figures(at) -> dict[str, dict]:
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def run_page(at, models: list[str], timeout: float = 300) -> list[str]:
    """Pick ``models``, press Generate, wait for the job; return the texts shown (prompt
    first, then one box per model)."""
    at.multiselect(key="play_models").set_value(models)
    at.button(key="FormSubmitter:play_form-Generate").click().run()
    no_errors(at)
    job, t0 = at.session_state["play_job"], time.time()
    while job.running:
        assert time.time() - t0 < timeout, f"playground job still {job.status}"
        time.sleep(0.2)
    assert job.status == "done", job.error
    at.run()
    no_errors(at)
    return [c.value for c in at.code]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """The app on the Playground page, with two compressions of the demo model in the
    session: uniform at ratio 1.0 (every layer stays dense: identical weights) and at 0.6."""
    if not WIKI_TEST.exists():
        pytest.skip("needs ../shared/data")
    from streamlit.testing.v1 import AppTest
    from llrc_core.workflow import compress, decompose_copy
    from studio import common
    os.environ["LLRC_STUDIO_WORKSPACE"] = str(tmp_path_factory.mktemp("workspace"))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    app.run()
    loaded = common.base_model(str(DEMO), "auto", "auto")
    dec = decompose_copy(loaded.model, "svd")
    same = compress(loaded.model, dec, "uniform", ratio=1.0, copy=True)
    low = compress(loaded.model, dec, "uniform", ratio=0.6, copy=True)
    assert all(lp.dense for lp in same.plan.layers.values())
    assert low.plan.ratio("linear") == pytest.approx(0.6, abs=1e-3)
    app.session_state["results"] = {"uniform 1.00": same, "uniform 0.60": low}
    app.switch_page("pages/playground.py").run()
    no_errors(app)
    yield app, loaded, low
    os.environ.pop("LLRC_STUDIO_WORKSPACE", None)


def test_page_dense_next_to_compressed_models(studio):
    from studio import common
    at, loaded, low = studio
    before = checksum(loaded.model)
    assert at.multiselect(key="play_models").options == ["uniform 0.60", "uniform 1.00"]
    assert at.multiselect(key="play_models").value == ["uniform 0.60"]     # the newest
    at.number_input(key="play_max_new").set_value(12)
    texts = run_page(at, ["uniform 1.00", "uniform 0.60"])
    assert at.session_state["play_job"].queue is common.job_queue()       # the shared queue
    prompt, dense_text, same_text, low_text = texts
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95,
                         top_k=50, seed=0)                      # the page's defaults
    ref = generate(loaded.model, loaded.tokenizer, PROMPT, cfg)
    ref_low = generate(low.model, loaded.tokenizer, PROMPT, cfg)
    assert prompt == PROMPT and dense_text == ref.text and low_text == ref_low.text
    assert same_text == dense_text                    # identical weights, same seed
    metrics = [(m.label, m.value) for m in at.metric]
    assert [label for label, _ in metrics] == ["tokens/s", "prompt perplexity"] * 3
    ppl = [float(v) for label, v in metrics if label == "prompt perplexity"]
    assert ppl == [pytest.approx(ref.prompt_ppl, abs=0.006)] * 2 + [
        pytest.approx(ref_low.prompt_ppl, abs=0.006)]
    assert ppl[2] != ppl[0] and all(float(v) > 0 for label, v in metrics if label == "tokens/s")
    assert any("same text as dense" in c.value for c in at.caption)
    params = [sum(p.numel() for p in m.parameters()) for m in (loaded.model, low.model)]
    assert f"{params[1] / 1e6:.2f} M parameters ({params[1] / params[0]:.0%} of dense)" in [
        c.value for c in at.caption]
    figs = figures(at)
    assert set(figs) == {"fig_play_0", "fig_play_1", "fig_play_2"}
    dense_fig, low_fig = figs["fig_play_0"]["data"], figs["fig_play_2"]["data"]
    assert figs["fig_play_1"]["data"] == dense_fig
    assert len(dense_fig) == 6 and dense_fig[0]["x"] == pytest.approx(
        [s.probs[0] for s in ref.steps], abs=1e-6)
    assert low_fig[0]["x"] == pytest.approx([s.probs[0] for s in ref_low.steps], abs=1e-6)
    # A second run with the same settings: the same text, word for word.
    assert run_page(at, ["uniform 1.00", "uniform 0.60"]) == texts
    assert checksum(loaded.model) == before           # the shared base model is untouched


def test_page_offers_only_this_sessions_studio_exports(studio):
    from llrc_core.export import export_model
    from studio import workspace
    at, loaded, low = studio
    sid = at.session_state["session_id"]
    folder = workspace.export_folder(sid, "low06")
    export_model(low.model, loaded.tokenizer, low.plan, folder, dtype="float32")
    workspace.mark(folder)
    foreign = workspace.export_folder(sid, "foreign")      # not written by the studio
    export_model(low.model, loaded.tokenizer, low.plan, foreign, dtype="float32")
    at.run()
    no_errors(at)
    options = at.multiselect(key="play_models").options
    assert "export: low06" in options and "export: foreign" not in options
    _, dense_text, export_text, low_text = run_page(at, ["export: low06", "uniform 0.60"])
    assert export_text == low_text              # the reloaded export: the same weights
    built = at.session_state["play_built"]
    assert set(built) == {"export: low06"}      # loaded once for this session
    # A comparison's plan (no model kept): rebuilt on a copy of the base model in the job.
    at.session_state["results"]["plan 0.60"] = {"plan": low.plan.to_dict(),
                                                "decomposition": "svd", "method": "uniform"}
    at.run()
    texts = run_page(at, ["plan 0.60", "export: low06"])
    assert texts[2:] == [low_text, low_text]
    assert set(at.session_state["play_built"]) == {"plan 0.60", "export: low06"}
    assert type(built["export: low06"][1][0].get_submodule(
        "bert.encoder.layer.0.intermediate.dense")).__name__ == "LowRankLinear"


# --- the page in headless Chromium ---------------------------------------------------------------
@pytest.mark.browser
def test_browser_dense_next_to_exports(tmp_path):
    """Two exports of this session (uniform at ratio 1.0: the dense weights; and at 0.6) next
    to the dense model, in the browser: the same text for the same weights and seed, twice."""
    pytest.importorskip("playwright")
    from playwright.sync_api import expect, sync_playwright
    from test_browser import ARGS, ARTIFACTS, CHROMIUM, FIGURES_JS, nav, serve, shot, stop
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (apt chromium)")
    from llrc_core import load_model
    from llrc_core.export import export_model
    from llrc_core.workflow import compress, decompose_copy
    from studio import workspace
    ws, sid = ARTIFACTS / "workspace-playground", workspace.new_session_id()
    shutil.rmtree(ws, ignore_errors=True)
    loaded = load_model(DEMO, device="cpu", dtype="float32")     # what the server loads
    dec = decompose_copy(loaded.model, "svd")
    for name, ratio in (("same", 1.0), ("low", 0.6)):
        result = compress(loaded.model, dec, "uniform", ratio=ratio, copy=True)
        folder = ws / "sessions" / sid / "exports" / name
        export_model(result.model, loaded.tokenizer, result.plan, folder, dtype="float32")
        workspace.mark(folder)
    proc, url = serve(ws, "streamlit-playground.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.set_default_timeout(180_000)
            expect.set_options(timeout=180_000)
            try:
                page.goto(f"{url}/?s={sid}")                    # this session's folder
                expect(page.get_by_text("Target layers", exact=True)).to_be_visible()
                nav(page, "Playground")
                page.get_by_test_id("stMultiSelect").click()
                page.get_by_role("option", name="export: same").click()
                page.get_by_test_id("stMultiSelect").click()
                page.get_by_role("option", name="export: low").click()
                box = page.get_by_label("Max new tokens", exact=True)
                box.fill("12")
                box.press("Tab")
                runs, charts = [], []
                for run in (1, 2):
                    page.get_by_role("button", name="Generate").click()
                    expect(page.get_by_text(f"Run {run}: done after", exact=False)
                           ).to_be_visible()
                    expect(page.get_by_test_id("stMetricValue")).to_have_count(6)
                    runs.append(page.get_by_test_id("stCode").all_inner_texts())
                    # one chart per model once the page has settled (a rerun may briefly
                    # still hold the previous run's chart next to the new one)
                    expect(page.locator(".js-plotly-plot")).to_have_count(3)
                    charts.append(page.evaluate(FIGURES_JS))
                    page.wait_for_timeout(500)
                png = shot(page, "playground")
            finally:
                browser.close()
    finally:
        stop(proc)
    first, second = runs
    assert len(first) == 4 and first[0] == PROMPT
    assert first[1] == first[2] and len(first[1].split()) >= 3     # identical weights, seed
    assert second == first                                         # the same run again
    assert png and charts[0] == charts[1]
    dense_chart, same_chart, low_chart = charts[0]
    assert all(c["title"] == "Next-token probabilities" for c in charts[0])
    assert dense_chart == same_chart and [t["name"] for t in dense_chart["traces"]] == [
        "rank 1", "rank 2", "rank 3", "rank 4", "rank 5", "other"]
    assert all(t["n"] == 4 for t in low_chart["traces"])                  # 4 steps each
