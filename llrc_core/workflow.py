"""Whole-run helpers for interactive faces (the app, notebooks): work on copies, never on a
shared base model.

A base model may be shared by many users (the app caches one per source). Anything that
installs hooks, swaps modules or toggles config flags therefore runs on a deep copy:
``decompose_copy`` (statistics hooks), ``compress_copy`` (masked layers, then the plan).
Events follow the selector callback contract (``{"type": ...}`` dicts); this module adds
``phase`` and ``eval`` events and a ``done`` event for selectors that send none.
"""
from __future__ import annotations

import copy
import io
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .evaluate import perplexity
from .pipeline import Decomposed, compress_, decompose_model, select_plan
from .plan import RankPlan

Emit = Callable[[dict], None]


@dataclass
class CompressionResult:
    model: torch.nn.Module          # the compressed copy
    plan: RankPlan
    method: str
    options: dict                   # selector config fields as given
    ppl_before: float | None = None
    ppl_after: float | None = None
    stopped: bool = False
    seconds: float = 0.0
    report: dict = field(default_factory=dict)


def decompose_copy(base_model, decomposition: str, windows=None, **kw) -> Decomposed:
    """Decompose the targets of ``base_model`` without touching it: data-aware methods hook a
    deep copy (the factors only depend on the weights, which the copy shares in value)."""
    model = base_model if decomposition == "svd" else copy.deepcopy(base_model)
    return decompose_model(model, decomposition, windows, **kw)


def compress_copy(base_model, dec: Decomposed, method: str, windows=None, eval_ids=None, *,
                  emit: Emit = lambda e: None, should_stop: Callable[[], bool] = lambda: False,
                  batch_size: int = 8, **options) -> CompressionResult:
    """Copy ``base_model``, select a plan with ``method`` (events go to ``emit``), apply it to
    the copy and, with ``eval_ids`` (k, L), measure perplexity before and after."""
    t0 = time.time()
    emit({"type": "phase", "phase": "copy"})
    model = copy.deepcopy(base_model)
    ppl_before = None
    if eval_ids is not None:
        emit({"type": "phase", "phase": "ppl_before"})
        ppl_before = perplexity(model, eval_ids, batch_size)["ppl"]
        emit({"type": "eval", "ppl_before": ppl_before})
    emit({"type": "phase", "phase": "select"})
    seen_done = []

    def relay(event: dict) -> None:
        if event.get("type") == "done":
            seen_done.append(event)
        emit(event)

    plan = select_plan(model, dec, method, windows, callback=relay, should_stop=should_stop,
                       **options)
    stopped = bool(seen_done and seen_done[-1].get("stopped")) or should_stop()
    if not seen_done:   # selectors without a training loop report nothing else
        emit({"type": "done", "step": 0, "plan": plan.to_dict(), "stopped": stopped})
    emit({"type": "phase", "phase": "apply"})
    compress_(model, dec, plan)
    ppl_after = None
    if eval_ids is not None:
        emit({"type": "phase", "phase": "ppl_after"})
        ppl_after = perplexity(model, eval_ids, batch_size)["ppl"]
        emit({"type": "eval", "ppl_before": ppl_before, "ppl_after": ppl_after})
    seconds = time.time() - t0
    report = {"method": method, "decomposition": dec.decomposition, **options,
              **{k: v for k, v in plan.summary().items() if k != "ranks"},
              "ppl_before": ppl_before, "ppl_after": ppl_after, "stopped": stopped,
              "seconds": seconds}
    emit({"type": "phase", "phase": "finished"})
    return CompressionResult(model, plan, method, dict(options), ppl_before, ppl_after,
                             stopped, seconds, report)


@torch.no_grad()
def max_logit_diff(model_a, model_b, ids: torch.Tensor) -> float:
    """``max |logits_a - logits_b|`` on token ids (k, L): 0 for identical models."""
    a = model_a.eval()(input_ids=ids).logits.float()
    b = model_b.eval()(input_ids=ids.to(next(model_b.parameters()).device)).logits.float()
    return float((a - b.to(a.device)).abs().max())


def zip_folder(path: str | Path) -> bytes:
    """A zip archive (in memory) of every file under ``path``, names relative to its parent."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(path.parent))
    return buf.getvalue()


def model_card(plan: RankPlan, report: dict, base: str) -> str:
    """A short Markdown model card: base model, method, ratios, perplexity, how to load."""
    s = plan.summary()
    lines = [f"# Low-rank compressed {Path(base).name}", "",
             f"Compressed from `{base}` with LLRC Studio.", "",
             "| field | value |", "|---|---|",
             f"| method | {s['method']} |", f"| decomposition | {s['decomposition']} |",
             f"| selection | {s['selection']} |",
             f"| parameter ratio (target layers) | {s['achieved_ratio_linear']:.4f} |",
             f"| parameter ratio (whole model) | {s['achieved_ratio_model']:.4f} |",
             f"| dense layers | {s['dense_layers']} of {len(plan.layers)} |"]
    for key in ("ppl_before", "ppl_after"):
        if report.get(key) is not None:
            lines.append(f"| WikiText-2 perplexity {key[4:]} | {report[key]:.2f} |")
    lines += ["", "Kept ranks per layer are in `rank_plan.csv` (indices in `rank_plan.json`).",
              "", "```python", "from llrc_core.export import load_compressed",
              "model, tokenizer, plan = load_compressed('path/to/this/folder')", "```", ""]
    return "\n".join(lines)
