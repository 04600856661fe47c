"""The one orchestration of a compression run, for the CLI, the app and the comparison grid:
select a plan with a method, apply it, evaluate before and after, report.

``compress`` works in place (the CLI, the grid: they own their model) or on a deep copy
(``copy=True``: the app, whose base model is shared by every session and never mutated).
Events follow the selector callback contract (``{"type": ...}`` dicts); this module adds
``phase`` and ``eval`` events, and the ``done`` event for selectors without a training loop.
A stop follows the one contract (``errors.Stopped``): a stopped selection returns its plan
marked ``stopped``, or raises ``Stopped`` when it has none or the caller refuses partial ones.
"""
from __future__ import annotations

import copy as copy_module
import io
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import Stopped
from .evaluate import eval_info, window_evaluator
from .pipeline import Decomposed, compress_, decompose_model, select_plan, select_voted
from .plan import RankPlan
from .polish import PolishConfig, polish_plan, polish_report
from .refit import refit_
from .selectors import get_selector

Emit = Callable[[dict], None]
EVAL_BATCH_SIZE = 8     # windows a batch when compress evaluates or refits
PLUMBING = ("cache_dir", "checkpoint", "checkpoint_every", "mask_every")   # select_plan's


@dataclass
class CompressionResult:
    model: torch.nn.Module          # the compressed model (the copy, with ``copy=True``)
    plan: RankPlan
    method: str
    options: dict                   # selector config fields as given
    before: dict = field(default_factory=dict)      # metrics of the dense model
    after: dict = field(default_factory=dict)       # metrics of the compressed model
    stopped: bool = False
    select_seconds: float = 0.0
    seconds: float = 0.0
    report: dict = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)   # what the run had to bend

    @property
    def ppl_before(self) -> float | None:
        return self.before.get("ppl")

    @property
    def ppl_after(self) -> float | None:
        return self.after.get("ppl")

    @property
    def metrics(self) -> dict:
        """The measured metrics as ``{name}_before`` / ``{name}_after`` (``ppl``, or an
        encoder's ``fidelity``): for the callers' reports."""
        return _suffixed(self.before, self.after)

    @property
    def refit(self) -> dict:
        """``{"refit": bool}`` and, when it ran, ``refit_seconds`` and ``refit_windows`` (how
        many it was fitted on): for the callers' reports."""
        return {k: v for k, v in self.report.items() if k.startswith("refit")}

    @property
    def polish(self) -> dict:
        """``{"polish": config or None}`` and, when it ran, its loss before and after, moves
        and seconds (``polish_*``): for the callers' reports."""
        return {k: v for k, v in self.report.items() if k.startswith("polish")}


def decompose_copy(base_model, decomposition: str, windows=None, **kw) -> Decomposed:
    """Decompose the targets of ``base_model`` without touching it: data-aware methods hook a
    deep copy (the factors only depend on the weights, which the copy shares in value)."""
    model = base_model if decomposition == "svd" else copy_module.deepcopy(base_model)
    return decompose_model(model, decomposition, windows, **kw)


def compress(model, dec: Decomposed, method: str, windows=None, *, eval_ids=None,
             evaluate: Callable[[torch.nn.Module], dict] | None = None, before: bool = True,
             plan: RankPlan | None = None, copy: bool = False, partial: bool = True,
             emit: Emit = lambda e: None, should_stop: Callable[[], bool] = lambda: False,
             eval_batch_size: int = EVAL_BATCH_SIZE, release_factors: bool = False,
             refit: bool = False, refit_windows: torch.Tensor | None = None,
             vote_seeds: tuple = (), polish: PolishConfig | None = None,
             polish_windows: torch.Tensor | None = None, **options) -> CompressionResult:
    """Select a plan with ``method`` (or take ``plan``), apply it and evaluate.

    ``evaluate(model) -> dict`` measures a model (default with ``eval_ids`` (k, L): its
    perplexity, an encoder's embedding fidelity to the dense model, ``eval_batch_size``
    windows at a time: ``evaluate.window_evaluator``); ``before`` measures the dense model
    first. ``options``: the method's config fields (its own ``batch_size`` among them) and
    ``select_plan``'s plumbing (``cache_dir``, ``checkpoint``, ...). A stopped
    selection raises ``Stopped`` unless ``partial`` (keep a stopped learned plan).
    ``release_factors``: each layer's full-rank factors leave ``dec`` once it is applied (a
    one-shot run: they are not needed again, and the memory planner counts on it).
    ``refit``: once applied, each low-rank layer's output factor is refitted to the inputs the
    compressed model feeds it, on ``refit_windows`` if given, else on ``windows``
    (``refit.py``). ``vote_seeds`` (two or more): a
    learned ``method`` runs once per seed and the vote of their plans is kept
    (``pipeline.select_voted``). ``polish``: before it is applied, the plan (selected or
    given) moves singular values between layers while that lowers the next-token loss on
    ``polish_windows`` (``polish.py``); stopped, it keeps the moves made (``partial``)."""
    t0 = time.time()
    if copy:
        emit({"type": "phase", "phase": "copy"})
        model = copy_module.deepcopy(model)
    if evaluate is None and eval_ids is not None:
        evaluate = window_evaluator(model, eval_ids, eval_batch_size)
    metrics_before = {}
    if evaluate is not None and before:
        emit({"type": "phase", "phase": "ppl_before"})
        metrics_before = evaluate(model)
        emit({"type": "eval", **_suffixed(metrics_before, {})})
    select_seconds, stopped = 0.0, False
    if plan is None:
        emit({"type": "phase", "phase": "select"})
        t1 = time.time()
        if len(vote_seeds) > 1:
            plan = select_voted(model, dec, method, windows, tuple(vote_seeds), emit,
                                should_stop, **options)
        else:
            plan = select_plan(model, dec, method, windows, callback=emit,
                               should_stop=should_stop, **options)
        select_seconds = time.time() - t1
        stopped = bool(plan.meta.get("stopped")) or should_stop()
        if stopped and not partial:
            raise Stopped(f"{method} was stopped before its plan was final")
        if not get_selector(method).trains:   # no training loop: no done event of its own
            emit({"type": "done", "step": 0, "plan": plan.to_dict(), "stopped": stopped})
    if polish is not None and not stopped:
        plan = polish_plan(model, dec, plan, polish_windows, polish, emit, should_stop)
        stopped = plan.meta["polish"]["stopped"]
        if stopped and not partial:
            raise Stopped("the polish was stopped before its plan was final")
    emit({"type": "phase", "phase": "apply"})
    compress_(model, dec, plan, release=release_factors)
    refitted = {}
    if refit:
        ids = windows if refit_windows is None else refit_windows
        if ids is None:
            raise ValueError("refit needs the calibration windows: pass --calib")
        emit({"type": "phase", "phase": "refit"})
        t1 = time.time()
        refit_(model, ids, eval_batch_size)
        refitted = {"refit_seconds": time.time() - t1, "refit_windows": int(ids.shape[0])}
    metrics_after = {}
    if evaluate is not None:
        emit({"type": "phase", "phase": "ppl_after"})
        metrics_after = evaluate(model)
        emit({"type": "eval", **_suffixed(metrics_before, metrics_after)})
    config = {k: v for k, v in options.items() if k not in PLUMBING}
    warnings = [*dec.warnings, *plan.meta.get("warnings", [])]
    report = {"method": method, "decomposition": dec.decomposition, **config,
              **{k: v for k, v in plan.summary().items() if k != "ranks"},
              **_suffixed(metrics_before, metrics_after),
              "stopped": stopped, "select_seconds": select_seconds,
              "refit": refit, **refitted,
              **polish_report(plan),
              **({"vote_seeds": list(vote_seeds)} if len(vote_seeds) > 1 else {}),
              **(eval_info(eval_ids) if eval_ids is not None else {}),
              "seconds": time.time() - t0, "warnings": warnings}
    emit({"type": "phase", "phase": "finished"})
    return CompressionResult(model, plan, method, config, metrics_before, metrics_after,
                             stopped, select_seconds, time.time() - t0, report, warnings)


def _suffixed(before: dict, after: dict) -> dict:
    """``{"ppl": 1}, {"ppl": 2}`` -> ``{"ppl_before": 1, "ppl_after": 2}``."""
    return {**{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()}}


@torch.no_grad()
def max_logit_diff(model_a, model_b, ids: torch.Tensor) -> float:
    """``max |logits_a - logits_b|`` on token ids (k, L) (an encoder's: of its last hidden
    states, its first output): 0 for identical models."""
    a = model_a.eval()(input_ids=ids)[0].float()
    b = model_b.eval()(input_ids=ids.to(next(model_b.parameters()).device))[0].float()
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
