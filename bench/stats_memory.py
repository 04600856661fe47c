"""Benchmark: one Llama-2-7B-shaped block's whitening statistics, the peak memory they take.

Layers fed one tensor (q, k, v; gate, up) share one statistics object (``stats.py``). This
measures the statistics pass of one random-weight bf16 block on the CPU with the code of each
``--code`` folder (a checkout of this project: e.g. the commit before a change, via
``git worktree add``), each in its own process, one after another, so the figures sit side
by side:

    python bench/stats_memory.py --code /tmp/old .
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(code: str) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    from stats_decompose import _setup             # puts this checkout on sys.path ...
    sys.path.insert(0, code)                       # ... and ``code`` goes before it
    from llrc_core.models import find_targets
    from llrc_core.stats import collect_stats
    torch.set_num_threads(1)
    model, windows = _setup("llama2-7b-1block", 2, 64, "cpu", "bfloat16")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    got = collect_stats(model, find_targets(model), windows, absmean=False, batch_size=2)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    grams = {id(s): s.gram.numel() * 8 for s in got.values()}
    return {"peak_over_model_gb": round((peak - base) * 1024 / 1e9, 2),
            "distinct_grams": len(grams), "gram_gb": round(sum(grams.values()) / 1e9, 2),
            "seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", nargs="+", default=[str(HERE.parent)],
                    help="project checkouts to measure, in turn")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        result = worker(a.worker)
        import llrc_core                           # the checkout measured, as a check
        print(json.dumps({**result, "code": str(Path(llrc_core.__file__).parent)}))
        return 0
    for code in a.code:
        out = subprocess.run([sys.executable, __file__, "--worker", str(Path(code).resolve())],
                             capture_output=True, text=True)
        line = (out.stdout.strip().splitlines() or [out.stderr.strip()[-300:]])[-1]
        print(f"{code}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
