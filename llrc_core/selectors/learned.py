"""The one mask-training loop of the learned selectors (LLRC, ARS, ARA).

``train_masks(ctx, cfg, Trainer, name)`` owns everything but the maths: validation, the
masked-model session that always restores the model, the stop check, the optimiser step,
the non-finite-loss guard, step / masks / done events, checkpoints (resume to the same
plan), the CPU thread count (measured as the run goes, ``threads.py``), timing and the plan.
A method supplies a ``MaskTrainer``: its parameters and optimiser, the loss of one step,
the counts it keeps, and its finalisation.

The training objective (next-token loss, or hidden-state distillation for encoders and
LLRC) is one ``Objective`` class (``objective.py``); batches come from ``batch_indices`` or
a per-step seeded generator (``step_generator``), so every run is reproducible and resumable.

Data parallel (``torchrun``; ``distributed.py``): each rank computes the objective on its
share of every global batch, one all-reduce averages the mask gradients, every rank steps
alike and ends with the same plan; only the main rank writes checkpoints.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from .. import distributed
from ..apply import originals_of, park_, restore_
from ..config import option
from ..counting import layer_cost, ratios
from ..errors import TrainingError
from ..files import atomic_write
from ..masked import MaskedLowRank, install_masked_
from ..placement import Placement
from ..plan import RankPlan
from ..threads import ThreadChooser, one_thread
from .base import SelectConfig, SelectionContext
from .objective import OBJECTIVES, Objective
from .registry import register_selector


def check_fields(cfg, positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = ()) -> None:
    """``ValueError`` naming the first config field out of range (config validation)."""
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
    for name in nonneg:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")


@dataclass
class TrainConfig(SelectConfig):
    """Fields every learned method takes; a method re-declares one to change its default."""
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES

    steps: int = option(300, "training steps (at most)")
    lr: float = option(1e-2, "learning rate")
    batch_size: int = option(4, "calibration windows per step")
    objective: str = option("auto", "'lm' (next-token CE), 'distill' (last hidden-state MSE) "
                            "or 'auto' (lm when the model has an LM head)")
    seed: int = option(0, "seed of the initialisation, the noise and the batch order")

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_fields(self, positive=("lr",))
        if self.objective not in self.objectives:
            raise ValueError(f"objective must be one of {self.objectives}, got "
                             f"{self.objective!r}")


def check_context(ctx: SelectionContext, method: str) -> None:
    if ctx.model is None or ctx.windows is None:
        raise ValueError(f"{method} trains on the model: it needs the model and calibration "
                         "windows (pass --calib / windows to select_plan)")
    missing = [n for n in ctx.shapes if n not in ctx.factors]
    if missing:
        raise ValueError(f"{method} needs the factors of every target layer; missing "
                         f"{missing[:3]}: decompose the model first")


@contextmanager
def masked_session(model: nn.Module, factors: dict, placement: Placement | None = None
                   ) -> Iterator[dict[str, MaskedLowRank]]:
    """Swap the targets for ``MaskedLowRank`` layers, freeze every model parameter, switch
    dropout and the KV cache off; on exit (normal, error or stop) put everything back. With
    a ``placement``: offloaded factors stay in CPU memory, sharded ones are split over the
    processes, and parked dense originals wait in CPU memory until the exit
    (``placement.py``)."""
    if originals_of(model):
        raise ValueError("the model already has swapped layers (a plan is applied); call "
                         "llrc_core.apply.restore_(model) before selecting a new plan")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()                       # no dropout: the mask is the only noise
        if use_cache is not None:
            cfg.use_cache = False
        layers = install_masked_(model, factors, bool(placement and placement.offload_factors),
                                 bool(placement and placement.sharded))
        if placement is not None and placement.park_dense:
            park_(model, layers)                  # restore_ puts them back on their device
        yield layers
    finally:
        restore_(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if use_cache is not None:
            cfg.use_cache = use_cache


# --- accounting ---------------------------------------------------------------------------
def achieved(ctx: SelectionContext, counts: dict[str, int]) -> dict[str, float]:
    """Ratios in both scopes of keeping ``counts[name]`` singular values per layer
    (break-even rule included)."""
    cost = sum(layer_cost(*ctx.shapes[n], max(1, k)) for n, k in counts.items())
    return ratios(cost, ctx.dense_linear, ctx.total_params)


def other_params(ctx: SelectionContext) -> int:
    """Parameters that are never decomposed (embeddings, norms, biases, head)."""
    return ctx.total_params - ctx.dense_linear


# --- what a method supplies ---------------------------------------------------------------
class MaskTrainer:
    """A learned method's part of the loop. Subclasses set ``self.optimizer`` in
    ``__init__`` and implement ``loss``, ``update``, ``mask_probs`` and ``finalise``; the
    objective is built here, before the masks are installed (``make_objective``)."""

    def __init__(self, ctx: SelectionContext, cfg: SelectConfig, budget: int):
        self.ctx, self.cfg, self.budget = ctx, cfg, budget
        self.names = list(ctx.shapes)
        self.objective = self.make_objective()
        self.device = self.objective.device
        self.optimizer: torch.optim.Optimizer

    def make_objective(self) -> Objective:
        """Default: next-token loss, or last-layer distillation for an encoder."""
        return Objective(self.ctx.model, self.ctx.windows, self.cfg.objective,
                         self.cfg.batch_size, targets_device=self.ctx.targets_device())

    def prepare(self, stack: ExitStack, layers: dict[str, MaskedLowRank]) -> None:
        """Inside the session, before the first step (e.g. matmul path, checkpointing)."""

    def loss(self, layers: dict[str, MaskedLowRank], step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Set every layer's mask for step ``step`` (0-based) and return the loss and its
        named terms (floats, for the step event)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        """Mask parameters are few: their update runs on one thread (``one_thread``)."""
        with one_thread():
            self.optimizer.step()

    def update(self) -> tuple[dict[str, int], dict]:
        """After the optimiser step: the kept counts per layer and extra event fields."""
        raise NotImplementedError

    def finished(self) -> bool:
        """True when the method has converged before ``steps`` (LLRC's holding is over)."""
        return False

    def mask_probs(self) -> dict[str, list[float]]:
        raise NotImplementedError

    def finalise(self) -> tuple[dict[str, list[int]], dict]:
        """Kept indices per layer on the budget, and what the plan's meta should record."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def register_learned(name: str, config: type[TrainConfig], trainer: type[MaskTrainer],
                     **meta) -> Callable:
    """Register a learned method: its selector is ``train_masks`` with ``trainer``."""
    def select(ctx: SelectionContext, cfg: TrainConfig) -> RankPlan:
        return train_masks(ctx, cfg, trainer, name)
    select.__name__ = select.__qualname__ = f"select_{name}"
    return register_selector(name, config, trains=True, **meta)(select)


# --- the loop -----------------------------------------------------------------------------
def train_masks(ctx: SelectionContext, cfg: SelectConfig, trainer_cls: type[MaskTrainer],
                name: str) -> RankPlan:
    """Train ``trainer_cls``'s masks on ``ctx`` for at most ``cfg.steps`` steps (or until it
    converges, or ``ctx.should_stop()``), then return its plan on the budget. A stopped run
    returns a valid plan with ``meta["stopped"]``; with ``ctx.checkpoint`` it resumes."""
    check_context(ctx, name)
    budget = ctx.reachable_budget(cfg)
    threads = ThreadChooser(next(ctx.model.parameters()).device)   # measured, see threads.py
    with threads:
        threads.tick()                                  # the targets' forward passes too
        trainer = trainer_cls(ctx, cfg, budget)
        return _train(ctx, cfg, trainer, name, threads)


def _train(ctx: SelectionContext, cfg: SelectConfig, trainer: MaskTrainer, name: str,
           threads: ThreadChooser) -> RankPlan:
    emit = ctx.callback or (lambda event: None)
    step, stopped, t0, seen = 0, False, time.time(), []    # seen: the trained ratio per step
    if ctx.checkpoint and Path(ctx.checkpoint).exists():
        step = _resume(trainer, cfg, ctx.checkpoint)
    with masked_session(ctx.model, {n: ctx.factors[n] for n in trainer.names},
                        ctx.placement) as layers, \
            ExitStack() as stack:
        trainer.prepare(stack, layers)
        while step < cfg.steps and not trainer.finished():
            if ctx.should_stop():
                stopped = True
                break
            threads.tick()
            loss, terms = trainer.loss(layers, step)
            value = distributed.mean(loss.item())     # every rank sees (and stops on) a NaN
            if not math.isfinite(value):
                raise TrainingError(
                    f"{name} loss became {value} at step {step} ({_fmt(terms)}); lower "
                    f"lr (now {getattr(cfg, 'lr', '?')}), check the calibration text, or run "
                    "in float32")
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.backward(loss)
            distributed.average_grads(p for group in trainer.optimizer.param_groups
                                      for p in group["params"])
            trainer.optimizer_step()
            step += 1
            counts, extra = trainer.update()
            now = achieved(ctx, counts)
            seen.append(now[cfg.scope])
            emit({"type": "step", "step": step, "total_steps": cfg.steps, "loss": value,
                  **terms, "ratio_linear": now["linear"], "ratio_model": now["model"],
                  "target_ratio": cfg.ratio, **extra, "ranks": counts,
                  "seconds": time.time() - t0, "threads": threads.current})
            if ctx.mask_every and step % ctx.mask_every == 0 and ctx.callback is not None:
                emit({"type": "masks", "step": step, "probs": trainer.mask_probs()})
            if ctx.checkpoint and step % ctx.checkpoint_every == 0:
                _save(trainer, cfg, ctx.checkpoint, step)
        if ctx.checkpoint:
            _save(trainer, cfg, ctx.checkpoint, step)
        distributed.barrier()         # the checkpoint is whole before any rank reads it
    kept, meta = trainer.finalise()
    plan = ctx.plan(kept, name, cfg, steps=step, stopped=stopped, seconds=time.time() - t0,
                    objective=trainer.objective.kind, warnings=_landing_warnings(seen, cfg),
                    **meta)
    emit({"type": "done", "step": step, "plan": plan.to_dict(), "stopped": stopped})
    return plan


def _landing_warnings(seen: list[float], cfg: SelectConfig) -> list[dict]:
    """Say when the target came from the final budget landing rather than from training."""
    slack = getattr(cfg, "tolerance", 0.005)
    if not seen or seen[-1] <= cfg.ratio + slack:
        return []
    fix = "train longer (steps) or with a larger lr"
    if max(seen) == min(seen):
        return [{"kind": "masks_never_moved", "message": (
            f"the trained masks never moved in {len(seen)} steps (ratio stayed "
            f"{seen[-1]:.4f}): the plan comes from the budget landing alone; {fix}")}]
    return [{"kind": "target_by_landing", "message": (
        f"training ended at ratio {seen[-1]:.4f}, above the target {cfg.ratio:g}: the budget "
        f"landing closed the rest in score order; {fix}")}]


def _fmt(terms: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in terms.items() if isinstance(v, float))


def _save(trainer: MaskTrainer, cfg: SelectConfig, path: str, step: int) -> None:
    if not distributed.is_main():     # every rank holds the same state: one writer
        return
    state = {"step": step, "names": trainer.names, "config": json.dumps(cfg.to_dict()),
             "trainer": trainer.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume(trainer: MaskTrainer, cfg: SelectConfig, path: str) -> int:
    """Load a checkpoint of the same run (only ``steps`` may differ); returns its step."""
    state = torch.load(path, weights_only=True, map_location=trainer.device)
    saved, now = json.loads(state["config"]), cfg.to_dict()
    diff = sorted(k for k in set(saved) | set(now) if k != "steps" and saved.get(k) != now.get(k))
    if state["names"] != trainer.names or diff:
        raise TrainingError(f"checkpoint {path!r} belongs to another run (differs in "
                            f"{diff or 'layers'}); delete it or pick another file")
    trainer.load_state_dict(state["trainer"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])
