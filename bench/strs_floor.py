"""Benchmark: how much of STRS's sensitivity table is the vocabulary projection (issue 14).

Every sensitivity pass scores the model on the calibration windows, so it computes the
logits of every token: ``(B*T) x d`` by ``d x V`` multiply-adds, then the next-token
cross-entropy. This times that head alone on the model's own output layer (its weight and
bias, hidden states of the right shape), as the table runs it (``losses.next_token_nll_sum``
per window), and the GEMM without bias or loss, and reports the GFLOP/s reached and the
part of the table it sets: passes x batches x head seconds. No change to the method can
make that part smaller without computing other numbers (fewer tokens, a cheaper dtype).

    python bench/strs_floor.py                       # the demo model, 32 x 128 tokens
    python bench/strs_floor.py --n-calib 32 --batch-size 8 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llrc_core.losses import next_token_nll_sum                 # noqa: E402
from llrc_core.models import find_targets, load_model           # noqa: E402
from llrc_core.selectors.strs import STRSConfig, passes_needed   # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "assets" / "demo-model"))
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    head = loaded.model.get_output_embeddings()
    W, b = head.weight.detach(), head.bias
    V, d = W.shape
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    with torch.inference_mode():
        gemm = best_of(lambda: h.reshape(-1, d) @ W.T, args.repeat)
        full = best_of(lambda: next_token_nll_sum(torch.nn.functional.linear(h, W, b), ids)
                       .item(), args.repeat)
    passes = passes_needed(find_targets(loaded.model), STRSConfig().candidates)
    batches = -(-args.n_calib // B)
    out = {"threads": torch.get_num_threads(), "tokens_per_batch": B * T, "vocab": V,
           "hidden": d, "gemm_s": round(gemm, 4),
           "gemm_gflops": round(2 * B * T * d * V / gemm / 1e9, 1),
           "head_and_loss_s": round(full, 4), "passes": passes, "batches_per_pass": batches,
           "table_head_s": round(passes * batches * full, 1)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
