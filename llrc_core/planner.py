"""Memory planner: what a compression run needs, phase by phase, before anything is loaded.

The model is built on the meta device from its config (a folder holding only ``config.json``
is enough: any size, no memory, no weights), and the bytes of each phase are counted from
the layer shapes, the dtypes and the calibration settings, for the data path this package
runs today:

* **load**: the weights in the compute dtype.
* **statistics**: weights + one block's calibration hidden states (in and out) + that block's
  float64 statistics (a Gram ``n x n`` per target layer for whitening, a vector for ASVD: an
  upper bound, since layers fed the same tensor share one).
* **decomposition**: weights + the float32 factors ``U (m x r)``, ``V (r x n)`` of every target
  kept so far (all of them at the end) + the float64 work of the largest single SVD.
* **selection** (learned methods): weights (the dense originals stay on the device) + the
  float32 factors + the masked layers' copies of the factors in the compute dtype + the
  distillation targets + the activations kept for the backward pass of one batch + the mask
  logits with their optimiser state. Non-learned methods need only the factors.
* **apply** / **evaluate**: weights + factors + the kept-rank factors of every layer (at most
  the dense size). **export**: the state dict written once more on the CPU.

``peak_gpu_bytes`` is the largest need over the phases on the device the run uses (today one
device holds everything: multi-GPU placement is issue 11's next part, so ``gpus`` > 1 is
reported but not yet split); ``fits`` compares it with ``gpu_memory`` less a 5 % margin. On a
CPU-only plan (``gpus=0``) the same numbers are host memory. Activations are an estimate (per token and block: 12 hidden-size
and 5 intermediate-size values, batch x length tokens, every block) and are labelled so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .models import DTYPES, count_params, find_targets, skeleton

GIB = 2 ** 30
PHASES = ("load", "statistics", "decomposition", "selection", "apply", "evaluate", "export")


@dataclass
class MemoryPlan:
    """Bytes per phase (on the first GPU, or on the CPU when ``gpus == 0``) and the facts
    they were counted from."""
    model: str
    dtype: str
    method: str
    gpus: int
    gpu_memory: float | None                  # GiB per GPU (host when gpus == 0); None: unchecked
    phases: dict[str, int]                    # phase -> bytes on the first GPU (or host)
    cpu_phases: dict[str, int]                # phase -> host bytes
    facts: dict = field(default_factory=dict)  # counts the phases were built from

    @property
    def peak_gpu_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def _used(self) -> dict[str, int]:
        """Bytes per phase on the device that holds the run: the first GPU, or the host."""
        return self.phases if self.gpus else self.cpu_phases

    @property
    def peak_bytes(self) -> int:
        return max(self._used.values())

    @property
    def peak_phase(self) -> str:
        return max(self._used, key=self._used.get)

    @property
    def fits(self) -> bool:
        if self.gpu_memory is None:
            return True
        return self.peak_bytes <= 0.95 * self.gpu_memory * GIB

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "method": self.method,
                "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory,
                "peak_gpu_bytes": self.peak_gpu_bytes, "peak_phase": self.peak_phase,
                "fits": self.fits, "phases": self.phases, "cpu_phases": self.cpu_phases,
                "facts": self.facts}

    def table(self) -> str:
        where = f"per GPU ({self.gpus})" if self.gpus else "host"
        lines = [f"{'phase':<14}{where + ' GiB':>16}{'CPU GiB':>10}"]
        lines += [f"{p:<14}{self.phases[p] / GIB:>16.2f}{self.cpu_phases[p] / GIB:>10.2f}"
                  for p in PHASES]
        verdict = "fits" if self.fits else "does NOT fit"
        cap = "unchecked" if self.gpu_memory is None else \
            f"{self.gpu_memory:g} GiB {'per GPU' if self.gpus else 'of host memory'}, 5 % margin"
        lines.append(f"peak {self.peak_bytes / GIB:.2f} GiB in {self.peak_phase}: "
                     f"{verdict} ({cap})")
        return "\n".join(lines)


def plan_memory(model: str, dtype: str = "bfloat16", method: str = "llrc",
                decomposition: str = "whiten", n_calib: int = 64, seq_len: int = 512,
                batch_size: int = 4, gpus: int = 1, gpu_memory: float | None = 80.0,
                trust_remote_code: bool = False, meta=None) -> MemoryPlan:
    """Count the memory of compressing ``model`` (a folder or Hub id; only its config is
    read) with ``method`` at these settings. ``meta``: an already built model (meta-device,
    or loaded: only its shapes, parameter count and config are used)."""
    from .selectors import get_selector
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if gpus < 0 or min(n_calib, seq_len, batch_size) < 1:
        raise ValueError("gpus must be >= 0 and n_calib, seq_len, batch_size >= 1")
    spec = get_selector(method)
    meta = meta if meta is not None else skeleton(model, trust_remote_code)
    b = DTYPES[dtype].itemsize                                             # bytes per number
    targets = find_targets(meta)
    params = count_params(meta)
    cfg = meta.config
    d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * d)
    blocks = 1 + max(t.block for t in targets)

    factor_numbers = sum(min(t.m, t.n) * (t.m + t.n) for t in targets)     # U and V, full rank
    spectrum_numbers = sum(min(t.m, t.n) for t in targets)
    dense_linear = sum(t.m * t.n for t in targets)
    # Statistics of one block, an upper bound: one float64 Gram (or vector) per target layer
    # (layers fed the same tensor, q/k/v, share one at run time; that is not visible here).
    per_block: dict[int, list[int]] = {}
    for t in targets:
        per_block.setdefault(t.block, []).append(t.n)
    widest_block = max(per_block.values(), key=lambda ns: sum(n * n for n in ns))
    from .decompose import DECOMPOSITIONS
    needs = getattr(DECOMPOSITIONS.get(decomposition), "needs", ())
    stats = (8 * sum(n * n for n in widest_block) if "gram" in needs       # whiten, whiten-eig
             else 8 * sum(widest_block) if needs else 0)                    # asvd; svd: none
    tokens = n_calib * seq_len
    hidden = 2 * tokens * d * b                                            # one block in, out
    big = max(targets, key=lambda t: t.m * t.n)
    r = min(big.m, big.n)
    svd_work = 8 * (big.m * big.n + big.m * r + r * big.n + big.n * big.n + r)

    weights = params * b
    factors32 = 4 * (factor_numbers + spectrum_numbers)
    on_first = weights                        # one device holds the model (no placement yet)
    phases = {"load": on_first,
              "statistics": on_first + hidden + stats,
              "decomposition": on_first + factors32 + svd_work}
    if spec.trains:
        factor_copies = b * (factor_numbers + spectrum_numbers)
        targets_bytes = 2 * tokens * d * b if method == "llrc" else tokens * d * b
        act = batch_size * seq_len * blocks * (12 * d + 5 * inter) * b     # estimate
        logits = 3 * 4 * spectrum_numbers                                  # theta + Adam m, v
        selection = on_first + factors32 + factor_copies + targets_bytes + act + logits
        facts_sel = {"factor_copies_bytes": factor_copies, "distill_targets_bytes": targets_bytes,
                     "activations_bytes_estimate": act, "mask_state_bytes": logits}
    else:
        selection, facts_sel = on_first + factors32, {}
    kept = min(dense_linear, factor_numbers) * b      # kept-rank factors: at most the dense size
    phases.update(selection=selection, apply=on_first + factors32 + kept,
                  evaluate=on_first + factors32 + kept,
                  export=on_first + kept)
    host = {p: 0 for p in PHASES} if gpus else dict(phases)
    host["export"] = host["export"] + weights             # the state dict written from the CPU
    facts = {"params": params, "weights_bytes": weights, "targets": len(targets),
             "blocks": blocks, "hidden_size": d, "intermediate_size": inter,
             "dense_linear": dense_linear, "factor_numbers": factor_numbers,
             "factors_fp32_bytes": factors32, "stats_block_bytes": stats,
             "hidden_states_block_bytes": hidden, "svd_work_bytes": svd_work,
             "calibration_tokens": tokens,
             "placement": "one device (multi-GPU placement not implemented yet)", **facts_sel}
    return MemoryPlan(str(model), dtype, method, gpus, gpu_memory, phases, host, facts)


def refusal(plan: MemoryPlan) -> str:
    """The message ``compress`` stops with when a plan does not fit (a GPU or the host)."""
    need = plan.peak_bytes / GIB
    if plan.gpus:
        where, cap = "on one GPU", f"{plan.gpu_memory:g} GiB (5 % margin)"
        fix = "a GPU with more memory, a smaller --batch-size or --n-calib/--seq-len, or a " \
              "non-learned method"
    else:
        where, cap = "of memory", f"this machine's {plan.gpu_memory:.1f} GiB"
        fix = "a machine with more memory or a GPU, a smaller --batch-size or " \
              "--n-calib/--seq-len"
    return (f"{plan.model} with {plan.method} needs {need:.1f} GiB {where} in its "
            f"{plan.peak_phase} phase, more than {cap}: use {fix}; `llrc plan-memory` shows "
            "each phase")


def device_memory_gib(device: str | None) -> tuple[int, float]:
    """``(gpus, GiB per device)`` the run will have: the first CUDA device's memory, or the
    host's physical memory for a CPU run (``gpus == 0``)."""
    if device != "cpu" and torch.cuda.is_available():
        return 1, torch.cuda.get_device_properties(0).total_memory / GIB
    return 0, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


def check_fits(model: str, method: str, decomposition: str, *, dtype: str, n_calib: int,
               seq_len: int, batch_size: int, device: str | None, meta) -> MemoryPlan:
    """The plan of this run on the memory it will have; ``LLRCError`` when it cannot fit."""
    from .errors import LLRCError
    gpus, gib = device_memory_gib(device)
    plan = plan_memory(model, dtype, method, decomposition, n_calib, seq_len, batch_size,
                       gpus=gpus, gpu_memory=gib, meta=meta)
    if not plan.fits:
        raise LLRCError(refusal(plan))
    return plan
