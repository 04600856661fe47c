"""One low-rank layer, four ways, against its dense matrix: which forward to ship.

* ``modules``: ``A(B(x))``, two ``nn.Linear`` submodule calls (the layer before issue 14);
* ``chain``: ``F.linear(F.linear(x, B), A, bias)``, the shipped ``LowRankLinear.forward``;
* ``compiled``: ``torch.compile`` of that chain (``dynamic=True``);
* ``dense``: ``nn.Linear`` holding ``W = A B``.

Shapes are the Llama-medium / demo layers at the rank a uniform plan gives at ``--ratio``;
inputs are one decode step (batch x 1 token) and a prefill (1 x 512). Each form is timed with
``torch.utils.benchmark`` (CPU time of the process on one CPU thread, else wall), the forms
alternate for ``--rounds`` rounds and the median is kept; reported relative to ``chain``.

    python bench/low_rank_layer.py --threads 1
    python bench/low_rank_layer.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llrc_core.apply import LowRankLinear  # noqa: E402

SHAPES = {"llama-medium": [(1024, 1024), (2752, 1024), (1024, 2752)],
          "demo": [(384, 384), (1536, 384), (384, 1536)]}
INPUTS = [(1, 1), (8, 1), (1, 512)]


def modules(layer, x):
    return layer.A(layer.B(x))


@torch.compile(dynamic=True)
def _compiled(x, b, a, bias):
    return F.linear(F.linear(x, b), a, bias)


def compiled(layer, x):
    return _compiled(x, layer.B.weight, layer.A.weight, layer.A.bias)


def time_us(fn, x, cpu: bool, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer
    t = Timer("fn(x)", globals={"fn": fn, "x": x},
              timer=time.process_time if cpu else timeit.default_timer)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.6, help="kept share of each layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.1)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dt, cpu = getattr(torch, a.dtype), a.device == "cpu" and a.threads == 1
    g = torch.Generator().manual_seed(0)
    rows = []
    for model, shapes in SHAPES.items():
        for m, n in shapes:
            k = int(a.ratio * m * n / (m + n))
            A, B = torch.randn(m, k, generator=g) / k ** 0.5, torch.randn(k, n, generator=g)
            layer = LowRankLinear.from_factors(A.to(a.device, dt), B.to(a.device, dt),
                                               torch.zeros(m, device=a.device, dtype=dt))
            dense = nn.Linear(n, m, dtype=dt, device=a.device)
            dense.weight.copy_(layer.A.weight.double() @ layer.B.weight.double())
            forms = {"chain": layer, "modules": lambda x: modules(layer, x),
                     "compiled": lambda x: compiled(layer, x), "dense": dense}
            for b, t in INPUTS:
                x = torch.randn(b, t, n, device=a.device, dtype=dt)
                torch._dynamo.reset()        # one compiled graph per case: no recompile limit
                for f in forms.values():     # warm-up (compilation included)
                    f(x)
                us = {name: [] for name in forms}
                for _ in range(a.rounds):
                    for name, f in forms.items():
                        us[name].append(time_us(f, x, cpu, a.min_run_time))
                med = {name: statistics.median(v) for name, v in us.items()}
                rows.append({"model": model, "m": m, "n": n, "rank": k, "input": [b, t],
                             **{f"{name}_us": v for name, v in med.items()},
                             **{f"chain_speedup_vs_{name}": v / med["chain"]
                                for name, v in med.items() if name != "chain"}})
                r = rows[-1]
                print(f"| {model} | {m}x{n} | {k} | {b}x{t} | {med['chain']:.1f} | "
                      f"{r['chain_speedup_vs_modules']:.2f} | {r['chain_speedup_vs_compiled']:.2f}"
                      f" | {r['chain_speedup_vs_dense']:.2f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"clock": "process CPU time" if cpu else "wall",
                                            "threads": torch.get_num_threads(),
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
