"""The ablation bench's own arithmetic (``bench/ablations.py``), on rows made by hand: the
seed overlap of kept indices and the mean +- sd table, ``bench/eval_sampling.py``'s gap
closed per sample of windows, and ``bench/polish.py``'s refusal of flags it would ignore.
The benches themselves run in ``--smoke`` mode by hand (minutes), not in CI."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import ablations  # noqa: E402


def row(seed, kept_a, kept_b, ppl, ratio=0.8):
    layers = {"a": {"shape": [8, 6], "kept": kept_a}, "b": {"shape": [8, 6], "kept": kept_b}}
    return {"method": "llrc", "decomposition": "asvd", "selection": "any-k", "scope": "linear",
            "target_ratio": ratio, "seed": seed, "ppl": ppl, "achieved_ratio_linear": ratio,
            "achieved_ratio_model": ratio, "seconds": 1.0, "plan": {"layers": layers}}


def test_stability_is_the_mean_jaccard_overlap_over_layers_and_seed_pairs():
    rows = [row(0, [0, 1], [0, 1, 2], 9.0), row(1, [0, 2], None, 9.0)]   # None: dense (all 6)
    # layer a: {0,1} vs {0,2} -> 1/3; layer b: {0,1,2} vs {0..5} -> 3/6
    assert ablations.stability(rows) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert ablations.stability(rows[:1]) is None


def test_table_shows_mean_and_sample_sd_per_ratio():
    rows = [row(0, [0], [0], 10.0), row(1, [0], [0], 12.0), row(2, [0], [0], 14.0)]
    text = ablations.table({"base": rows}, (0.8,))
    assert "| base | 12.00 ± 2.00 | 3 | 1.00 |" in text
    assert set(ablations.VARIANTS) >= {"base", "tv-off", "lm-loss", "top-k", "constant-alpha",
                                       "whiten", "calib-8", "calib-256", "domain-piqa"}


def test_the_piqa_domain_variant_calibrates_on_plain_text(tmp_path):
    """The PIQA task file is JSON records that calibration does not read; the bench writes
    their instructions as a text once, and calibration reads it."""
    from llrc_core.calibration import local_text
    path = ablations._piqa_text(tmp_path)
    assert path == str(tmp_path / "piqa.txt")
    text = local_text(path, 128)
    assert "Solution1:" in text and len(text) > 100_000
    assert ablations._piqa_text(tmp_path) == path          # written once


def test_a_variant_may_set_its_own_window_length_and_gets_its_own_reference():
    """``seq_len`` in a variant overrides ``--seq-len`` for LLRC and for the SVD-LLM reference
    row of its calibration; a variant without it follows the flag."""
    args = ablations.argparse.Namespace(ratios=(0.6,), seeds=(0,), steps=None, seq_len=128,
                                        eval_windows=16, eval_sample="first",
                                        out="unused", refit=False, vote=False, polish=0)
    assert ablations.variant_config("whiten-seq256", args).seq_len == 256
    assert not ablations.variant_config("whiten", args).vote
    args_vote = ablations.argparse.Namespace(**{**vars(args), "vote": True})
    assert ablations.variant_config("whiten", args_vote).vote
    assert ablations.variant_config("whiten-seq256", args, "svdllm").seq_len == 256
    assert ablations.variant_config("whiten-calib-64-seq256", args).n_calib == 64
    assert ablations.variant_config("whiten", args).seq_len == 128
    assert ablations._calibration("whiten-seq256") != ablations._calibration("whiten")
    assert ablations.variant_config("whiten-calib-128-bs8", args).options == {
        "llrc": {"batch_size": 8}}
    assert not ablations.variant_config("whiten", args).refit
    args.refit = True                                 # --refit: every row refits, the reference too
    assert ablations.variant_config("whiten", args).refit
    assert ablations.variant_config("whiten", args, "svdllm").refit
    assert ablations.variant_config("whiten", args).polish == 0
    args.polish = 12                                  # --polish: every row, the reference too
    assert ablations.variant_config("whiten", args, "svdllm").polish == 12


def test_eval_sampling_gap_closed_on_each_sample_of_k_windows():
    """``bench/eval_sampling.py``'s arithmetic on per-token scores made by hand, 8 windows:
    dense at ppl 1, the reference at ppl 3, a plan at ppl 2 on the first 4 windows and as bad
    as the reference on the last 4."""
    import math

    import torch

    import eval_sampling
    nll = {"dense": torch.zeros(8, 5), "ref": torch.full((8, 5), math.log(3)),
           "a": torch.cat([torch.full((4, 5), math.log(2)), torch.full((4, 5), math.log(3))])}
    assert eval_sampling.gap_closed(nll, "a", "ref", torch.arange(4)) == pytest.approx(0.5)
    assert eval_sampling.gap_closed(nll, "a", "ref", torch.arange(4, 8)) == pytest.approx(0)
    mixed = (3 - math.sqrt(6)) / 2                   # half the tokens at ppl 2, half at 3
    (r,) = eval_sampling.sampling_table(nll, "ref", [4])
    assert (r["plan"], r["k"]) == ("a", 4)
    assert r["first"] == pytest.approx(0.5) and r["whole"] == pytest.approx(mixed)
    # two blocks of 4 consecutive windows: 0.5 and 0
    assert (r["blocks_mean"], r["blocks_sd"]) == pytest.approx((0.25, math.sqrt(0.125)))
    # spread samples (0, 2, 4, 6) and (1, 3, 5, 7) each hold two of each kind
    assert (r["spread_mean"], r["spread_sd"]) == pytest.approx((mixed, 0), abs=1e-6)
    assert [len(i) for i in eval_sampling.samples(1169, 16)["spread"]] == [16] * 73


def test_polish_bench_refuses_demo_only_flags_for_minilm(tmp_path, capsys):
    """``bench/polish.py --model minilm`` runs at compare's MiniLM defaults, so a demo-model
    setting it would not use is refused by name before anything loads or is written."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("polish_bench", ROOT / "bench" / "polish.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "minilm", "--seq-len", "64", "--eval-sample", "first",
                    "--out", str(out), str(tmp_path / "cell.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--seq-len, --eval-sample: only for the demo model" in err
    assert "--eval-windows" not in err.split("error:")[1]
    assert not out.exists()
