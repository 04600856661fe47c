"""Which low-rank layers run slower than the dense matrix they replace, timed on a device.

A factorised layer ``A (B x)`` reads ``k (m + n)`` numbers instead of ``m n`` but runs two GEMMs
instead of one. Near break-even (a small saving), for small matrices or one-token decode steps,
the second call and the thin shapes can cost more than the bytes saved. ``time_layers`` times
both forms of every low-rank layer of a model on the model's device and dtype;
``choose_stored_dense`` keeps the layers that are slower *and* save under ``dense_below`` of
their parameters. The export may then store those layers as one dense ``W = A B`` (the same
outputs, the saving given up) and recompute the stored ratio (``export_model(dense=...)``).

Timing uses ``torch.utils.benchmark`` (it synchronises CUDA); the two forms of a layer alternate
for ``rounds`` rounds and the median of each form is kept, so machine noise hits both alike. On
a CPU running torch on one thread the clock is the process's CPU time (on a machine shared with
other jobs wall time mostly measures the others), else wall time.
"""
from __future__ import annotations

import time
import timeit
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .plan import LayerPlan, RankPlan


@dataclass
class StoredDense:
    """Low-rank layers stored dense at export, and the rule that chose them."""
    dense_below: float = 0.0   # a slower layer saving under this share of its weights goes dense
    device: str = "cpu"        # where the two forms were timed
    dtype: str = "float32"     # dtype they were timed in
    batch: int = 1             # timed input: batch x tokens rows (1 x 1: one decode step)
    tokens: int = 1
    clock: str = "wall"        # "wall" or "process CPU time" (CPU, one thread)
    layers: dict[str, dict] = field(default_factory=dict)   # name -> saved_share, *_us timings

    def __post_init__(self):
        if not 0.0 <= float(self.dense_below) <= 1.0:
            raise ValueError(f"dense_below must be a share of a layer's parameters in [0, 1], "
                             f"got {self.dense_below!r}; e.g. --dense-below 0.1")
        if self.batch < 1 or self.tokens < 1:
            raise ValueError(f"batch and tokens must be >= 1, got {self.batch} x {self.tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoredDense":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def names_in(self, plan: RankPlan) -> list[str]:
        """The layers to store dense, each checked to be a low-rank layer of ``plan``."""
        wrong = [n for n in self.layers if n not in plan.layers or plan.layers[n].dense]
        if wrong:
            raise ValueError(f"layer {wrong[0]!r} is to be stored dense but is not a low-rank "
                             "layer of the plan")
        return sorted(self.layers)

    def describe(self, plan: RankPlan) -> str:
        """One line for the CLI: how many layers, why, and the recomputed stored ratio."""
        kept = self.stored_plan(plan)
        return (f"{len(self.layers)} low-rank layer(s) stored dense (slower factorised on "
                f"{self.device}, saving under {self.dense_below:.0%}): stored rho_linear "
                f"{kept.ratio('linear'):.4f} (selected {plan.ratio('linear'):.4f})")

    def stored_plan(self, plan: RankPlan) -> RankPlan:
        """``plan`` as stored: these layers count their dense ``m n`` weights (for ratios)."""
        layers = {n: LayerPlan(lp.m, lp.n) if n in self.layers else lp
                  for n, lp in plan.layers.items()}
        return RankPlan(layers, plan.total_params, plan.method, plan.decomposition,
                        plan.selection, plan.meta)


def saved_share(lp: LayerPlan) -> float:
    """Share of the layer's dense weights that its factors save (0 for a dense layer)."""
    return 1.0 - lp.params / (lp.m * lp.n)


def clock_of(device: torch.device) -> str:
    """The clock layers are timed with on ``device`` (module docstring)."""
    return "process CPU time" if device.type == "cpu" and torch.get_num_threads() == 1 \
        else "wall"


def _median_us(fn, x, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer
    cpu = clock_of(x.device) == "process CPU time"
    timer = Timer("fn(x)", globals={"fn": fn, "x": x},
                  timer=time.process_time if cpu else timeit.default_timer)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


@torch.no_grad()
def time_layers(model, plan: RankPlan, batch: int = 1, tokens: int = 1, rounds: int = 3,
                min_run_time: float = 0.01) -> dict[str, dict]:
    """``{name: {saved_share, factorised_us, dense_us}}`` for every layer of ``plan`` that the
    model holds factorised (``A.weight``, ``B.weight``), timed on an input of ``batch x tokens``
    rows in the layer's own dtype and device; the dense form is an ``nn.Linear`` holding
    ``W = A B`` (float64 product), so both pay one module call."""
    out = {}
    for name, lp in plan.layers.items():
        layer = model.get_submodule(name)
        if lp.dense or not (hasattr(layer, "A") and hasattr(layer, "B")):
            continue
        A, B, bias = layer.A.weight, layer.B.weight, layer.A.bias     # (m, k), (k, n), (m,)
        dense = nn.Linear(lp.n, lp.m, bias is not None, dtype=A.dtype, device=A.device)
        dense.weight.copy_(A.double() @ B.double())                    # W (m, n), a module
        if bias is not None:                                           # call like the layer's
            dense.bias.copy_(bias)
        x = torch.randn(batch, tokens, lp.n, dtype=A.dtype, device=A.device)
        low, full = [], []
        for _ in range(rounds):
            full.append(_median_us(dense, x, min_run_time))
            low.append(_median_us(layer, x, min_run_time))
        out[name] = {"saved_share": round(saved_share(lp), 4),
                     "factorised_us": round(sorted(low)[len(low) // 2], 2),
                     "dense_us": round(sorted(full)[len(full) // 2], 2)}
    return out


def pick_slow(timings: dict[str, dict], dense_below: float) -> dict[str, dict]:
    """The layers of ``timings`` slower factorised than dense that save under ``dense_below``."""
    return {n: t for n, t in timings.items()
            if t["factorised_us"] > t["dense_us"] and t["saved_share"] < dense_below}


def choose_stored_dense(model, plan: RankPlan, dense_below: float, batch: int = 1,
                        tokens: int = 1, rounds: int = 3,
                        already: StoredDense | None = None) -> StoredDense:
    """Time every factorised layer of ``model`` (on its device and dtype) and return the ones
    to store dense under ``dense_below``, with ``already`` (layers an export being re-exported
    stores dense: the model holds them as plain linear layers) kept."""
    rule = StoredDense(dense_below, batch=batch, tokens=tokens)   # validates before timing
    p = next(model.parameters())
    timings = time_layers(model, plan, batch, tokens, rounds) if dense_below > 0 else {}
    layers = {**(already.layers if already else {}), **pick_slow(timings, dense_below)}
    return StoredDense(rule.dense_below, str(p.device), str(p.dtype).removeprefix("torch."),
                       batch, tokens, clock_of(p.device), layers)


def stored_summary(info: dict) -> dict:
    """What an export stores, from its manifest (``export.export_info``): both stored ratios
    and the layers stored dense."""
    return {"stored_ratio_linear": info["storage"]["stored_ratio_linear"],
            "stored_ratio_model": info["storage"]["stored_ratio_model"],
            "layers_stored_dense": sorted((info.get("stored_dense") or {}).get("layers", {}))}
