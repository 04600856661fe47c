"""The GPU suite (issue 11): the Llama-2-7B shape with random bf16 weights on one GPU.

Four benches, each in its own process under its own time limit (default 560 s, so that
each fits the 10-minute command limit of a lent GPU machine), their JSON gathered in
``--out``:

1. ``memory``: statistics + whitening + SVD of all 224 layers (seconds), a few LLRC steps
   (seconds per step), apply and one evaluation batch, with each phase's peak
   ``max_memory_allocated`` against the planner's prediction (``bench/memory.py``).
   ``onload``: the same on eight Llama-2-70B-shaped blocks with sequential onloading
   (``--offload weights``): the blocks wait in CPU memory and visit the GPU layer by layer.
2. ``step``: one LLRC mask-training step against one dense forward + backward step on the
   same batch (``bench/llrc_step.py``).
3. ``inference``: decode and prefill tokens/s of compressed exports against dense at rho 0.8
   and 0.6 (``bench/inference.py``).

    python bench/gpu_suite.py --out gpu-results            # all four
    python bench/gpu_suite.py --only memory --limit 580    # one

Nothing here runs on a CPU-only machine: it stops with a message instead. The figures go
in ``bench/README.md`` with the GPU named.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = {
    "memory": ["memory.py", "--preset", "llama2-7b", "--device", "cuda", "--dtype", "bfloat16",
               "--n-calib", "64", "--seq-len", "512", "--steps", "5"],
    "onload": ["memory.py", "--preset", "llama2-70b-8blocks", "--device", "cuda", "--dtype",
               "bfloat16", "--offload", "weights", "--n-calib", "16", "--seq-len", "512",
               "--steps", "3"],
    "step": ["llrc_step.py", "--preset", "llama2-7b", "--device", "cuda", "--bf16",
             "--batch", "4", "--seq-len", "512", "--steps", "4"],
    "inference": ["inference.py", "--preset", "llama2-7b", "--device", "cuda", "--dtype",
                  "bfloat16", "--ratios", "0.8", "0.6", "--loaders", "llrc", "--repeats", "2"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-results", help="folder for one JSON per bench")
    ap.add_argument("--only", nargs="+", choices=list(SUITE), help="run these benches only")
    ap.add_argument("--limit", type=int, default=560, help="seconds per bench")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    for name in a.only or list(SUITE):
        script, *args = SUITE[name]
        dest = out / f"{name}.json"
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json",
                                   str(dest)], capture_output=True, text=True, timeout=a.limit)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            status, tail = f"over {a.limit} s", str(e.stdout or "")[-3000:]
        summary["runs"][name] = {"status": status, "seconds": round(time.perf_counter() - t, 1)}
        (out / f"{name}.log").write_text(tail)
        print(json.dumps({name: summary["runs"][name]}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
