"""Polish's exact checks on the kept values alone (``MaskedLowRank.keep_only``) against the
full-rank masked layers they replace, and the round that both make.

    python bench/polish_speed.py                       # demo model, rho 0.6, SVD-LLM's ranks
    python bench/polish_speed.py --ratio 0.8 --windows 64 --repeats 5
    python bench/polish_speed.py --preset llama-small --windows 8 --repeats 2

A round of ``polish.py`` is one pass with the gates' gradient and up to ``pairs`` exact
losses. The exact losses need no gradient, so they now run each layer at its kept rank; the
gradient pass still runs masked at full rank. The same plan's loss is taken both ways,
alternately (machine noise hits both alike), on the built default's windows (256 tokens, 8 a
batch); reported: seconds a loss each way, their ratio, the gradient pass's seconds, a
round's predicted ratio (1 gradient pass + ``pairs`` losses) and the largest difference of
the two losses (float rounding of another matmul order). ``--preset llama-small`` times a
Llama-shaped model of random weights instead (8 blocks of 1,024 / 2,752, vocabulary 32,000:
the target layers' share of the compute is an LLM's, where the demo model's LM head, 30,522 x
384, costs about as much as all its target layers), on SVD factors, uniform ranks and random
token ids: the time depends on the shapes and ranks alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llrc_core import load_model                                        # noqa: E402
from llrc_core.masked import MaskedLowRank                              # noqa: E402
from llrc_core.pipeline import calibrate, decompose_model, select_plan  # noqa: E402
from llrc_core.selectors.learned import masked_session                # noqa: E402
from llrc_core.polish import (PolishConfig, _loss,                      # noqa: E402
                               polish_objective, polish_windows)

WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--windows", type=int, default=32, help="polish windows (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="demo", choices=("demo", "llama-small"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pc = PolishConfig(windows=args.windows)
    if args.preset == "demo":
        loaded = load_model(str(ROOT / "assets" / "demo-model"), "cpu")
        model = loaded.model
        calib = calibrate(loaded, str(WIKI_VALID), 128, 128, seed=0)
        dec = decompose_model(model, "whiten", calib)
        plan = select_plan(model, dec, "svdllm", ratio=args.ratio)
        ids = polish_windows(loaded, str(WIKI_VALID), pc)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)).eval()
        dec = decompose_model(model, "svd")
        plan = select_plan(model, dec, "uniform", ratio=args.ratio)
        ids = torch.randint(0, 32000, (args.windows, pc.seq_len))
    kept = {n: frozenset(lp.kept) for n, lp in plan.layers.items() if not lp.dense}
    objective = polish_objective(model, ids, pc.batch_size)
    keep_only = MaskedLowRank.keep_only
    times = {"kept": [], "masked": [], "grad": []}
    losses = {"kept": [], "masked": []}
    with masked_session(model, {n: dec.factors[n] for n in plan.layers}) as layers:
        for _ in range(args.repeats):
            for way in ("kept", "masked"):
                # masked: every layer declines keep_only, as before it existed
                MaskedLowRank.keep_only = keep_only if way == "kept" else \
                    (lambda self, idx: keep_only(self, None) and idx is None)
                t0 = time.perf_counter()
                loss, _ = _loss(layers, kept, objective, len(ids), pc.batch_size)
                times[way].append(time.perf_counter() - t0)
                losses[way].append(loss)
            MaskedLowRank.keep_only = keep_only
            t0 = time.perf_counter()
            _loss(layers, kept, objective, len(ids), pc.batch_size, grad=True)
            times["grad"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    round_ratio = (med["grad"] + pc.pairs * med["masked"]) / (med["grad"] + pc.pairs * med["kept"])
    print(json.dumps({
        "preset": args.preset, "ratio": args.ratio, "windows": args.windows, "seq_len": pc.seq_len,
        "threads": args.threads, "repeats": args.repeats,
        "kept_rank_mean": statistics.mean(len(k) for k in kept.values()),
        "seconds_kept": round(med["kept"], 3), "seconds_masked": round(med["masked"], 3),
        "check_speedup": round(med["masked"] / med["kept"], 3),
        "seconds_grad": round(med["grad"], 3), "round_speedup": round(round_ratio, 3),
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["kept"], losses["masked"]))}))


if __name__ == "__main__":
    main()
