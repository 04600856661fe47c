"""Issue 16, "every result tells the truth": bad input is refused before any weight is read,
with a message naming the problem and the fix, exit status 2 and nothing written; what a
run had to bend travels as warnings (report.json, the CLI's last lines, the result)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import WIKI_VALID, tiny_ids, tiny_model, tiny_tokenizer
from llrc_core import models
from llrc_core.cli import main
from llrc_core.pipeline import decompose_model, select_plan
from llrc_core.selectors.learned import _landing_warnings
from llrc_core.selectors.llrc import LLRCConfig
from llrc_core.workflow import compress

ARCHS = ["llama", "qwen2", "gpt2", "opt"]       # GQA, GQA + biases, Conv1D, OPT


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny models of each architecture saved like Hub checkpoints, and calibration texts."""
    root = tmp_path_factory.mktemp("truth")
    for arch in ARCHS:
        tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
    lines = WIKI_VALID.read_text(encoding="utf-8").splitlines()[:800]
    (root / "calib.txt").write_text("\n".join(lines))
    (root / "empty.txt").write_text("  \n")
    (root / "tiny.txt").write_text("the cat sat")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("keep")
    return root


def min_ratio(folder) -> float:
    """Rank 1 in every target layer, from the shapes of the model itself."""
    shapes = [(t.m, t.n) for t in models.find_targets(tiny_model(folder.name))]
    return sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)


def compress_argv(root, arch, *extra, calib="calib.txt", out="out"):
    return ["compress", "--model", str(root / arch), "--calib", str(root / calib),
            "--n-calib", "4", "--seq-len", "16", "--out", str(root / out), *extra]


# (case, arch, extra argv (or a function of the root), message regex)
CASES = [
    ("mistyped-opt", "llama", ["--ratio", "0.8", "--method", "llrc", "--opt", "stepz=3"],
     r"unknown LLRCConfig fields \['stepz'\]"),
    ("bad-option-value", "qwen2", ["--ratio", "0.8", "--method", "llrc", "--opt", "tau=0"],
     r"tau must be > 0, got 0"),
    ("unsupported-selection", "gpt2", ["--ratio", "0.8", "--selection", "any-k"],
     r"'uniform' supports selection top-k, not 'any-k': use --selection top-k"),
    ("ratio-outside", "opt", ["--ratio", "1.5"], r"ratio must be in \(0, 1\]"),
    ("model-scope-unreachable", "llama", ["--ratio", "0.3", "--ratio-scope", "model"],
     r"model-scope ratio 0.3 is unreachable.*--ratio-scope linear"),
    ("empty-calibration", "qwen2", ["--ratio", "0.8", "--calib", "{root}/empty.txt"],
     r"calibration source .*empty.txt' is empty; give a text with at least 17 tokens"),
    ("tiny-calibration", "gpt2", ["--ratio", "0.8", "--calib", "{root}/tiny.txt"],
     r"has 3 tokens, fewer than one window of 16; give a longer text or a smaller --seq-len"),
    ("missing-calibration", "opt", ["--ratio", "0.8", "--calib", "{root}/nope.txt"],
     r"calibration source .*nope.txt' is neither an existing file"),
    ("missing-eval-text", "llama", ["--ratio", "0.8", "--eval-text", "{root}/nope.txt"],
     r"--eval-text not found"),
    ("output-not-empty", "qwen2", ["--ratio", "0.8", "--out", "{root}/full"],
     r"full' exists and is not empty; choose another folder or pass --force"),
]
# Every method refuses an unreachable target the same way, naming the minimum.
CASES += [(f"unreachable-{method}-{arch}", arch,
           ["--ratio", "0.005", "--method", method, "--decomposition", dec],
           "unreachable: rank 1 in every layer already keeps {min}; choose --ratio {min}")
          for arch in ARCHS for method, dec in (("llrc", "svd"), ("svdllm", "whiten"))]


@pytest.mark.parametrize("case,arch,extra,message", CASES, ids=[c[0] for c in CASES])
def test_refused_before_any_weight_is_read(case, arch, extra, message, folders, monkeypatch,
                                           capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", no_load)
    before = sorted(p.name for p in folders.iterdir())
    argv = [a.replace("{root}", str(folders)) for a in compress_argv(folders, arch, *extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    least = f"{min_ratio(folders / arch) + 5e-5:.4f}"      # rounded up to 4 places
    assert re.search(message.replace("{min}", least), err), err
    assert sorted(p.name for p in folders.iterdir()) == before       # nothing written
    assert [p.name for p in (folders / "full").iterdir()] == ["keep.txt"]


def test_mistyped_local_folder_says_so_at_once(folders, capsys):
    assert main(compress_argv(folders, "lama", "--ratio", "0.8")) == 2
    err = capsys.readouterr().err
    assert "model folder not found" in err and "did you mean" in err and "llama" in err


# --- warnings that travel -----------------------------------------------------------------
def test_degenerate_input_falls_back_to_svd_and_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.zero_()     # o_proj's input is zero
    ids = tiny_ids(4, 16)
    for dec_name in ("whiten", "asvd"):
        dec = decompose_model(model, dec_name, ids)
        degenerate = [w for w in dec.warnings if w["kind"] == "degenerate_input"]
        assert [w["layer"] for w in degenerate] == ["model.layers.1.self_attn.o_proj"]
        assert degenerate[0]["fallback"] == "svd" and "plain SVD" in degenerate[0]["message"]
        W = model.model.layers[1].self_attn.o_proj.weight
        assert torch.allclose(dec.factors["model.layers.1.self_attn.o_proj"].reconstruct(), W,
                              atol=1e-5)


def test_damped_grams_are_reported_with_their_damping():
    model = tiny_model("llama")
    dec = decompose_model(model, "whiten", tiny_ids(1, 8))   # 8 tokens, 32 features: singular
    damped = [w for w in dec.warnings if w["kind"] == "damped_gram"]
    assert damped and all(w["damping"] > 0 and w["layer"] in w["message"] for w in damped)
    assert {w["layer"] for w in damped} == {n for n, f in dec.factors.items() if f.damping > 0}


def test_masks_that_never_moved_are_reported_by_the_run(tmp_path):
    model, ids = tiny_model("llama"), tiny_ids(8, 16)
    dec = decompose_model(model, "svd")
    res = compress(model, dec, "llrc", ids, copy=True, ratio=0.5, steps=5, batch_size=2,
                   train_seq_len=0)
    kinds = [w["kind"] for w in res.warnings]
    assert kinds == ["masks_never_moved"] and res.report["warnings"] == res.warnings
    assert abs(res.plan.ratio("linear") - 0.5) <= 0.01          # met, but by the landing
    trained = select_plan(model, dec, "llrc", ids, ratio=0.6, steps=40, lr=0.2, batch_size=4,
                          train_seq_len=0, hold_steps=5)
    assert trained.meta["warnings"] == []


@pytest.mark.parametrize("seen,kind", [([1.0, 1.0, 1.0], "masks_never_moved"),
                                       ([1.0, 0.9, 0.7], "target_by_landing"),
                                       ([1.0, 0.8, 0.603], None), ([], None)])
def test_landing_warnings(seen, kind):
    got = _landing_warnings(seen, LLRCConfig(ratio=0.6))
    assert [w["kind"] for w in got] == ([kind] if kind else [])


def test_cli_report_and_last_lines_carry_the_warnings(folders, capsys):
    out = folders / "warned"
    assert main(compress_argv(folders, "llama", "--ratio", "0.5", "--method", "llrc",
                              "--decomposition", "svd",    # 4 x 16 tokens: whitening damps
                              "--opt", "steps=3", "--opt", "train_seq_len=0", out="warned")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    report = json.loads((out / "report.json").read_text())
    assert [w["kind"] for w in report["warnings"]] == ["masks_never_moved"]
    assert err[-1] == f"warning: {report['warnings'][0]['message']}"
