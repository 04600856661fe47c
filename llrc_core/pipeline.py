"""Orchestration shared by the CLI and the app: calibrate, decompose every target, select a
plan, apply it, evaluate. Pure maths lives in ``decompose``/``selectors``; this module owns
devices, hooks (through ``stats``) and progress."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .analysis import cumulative_energy
from .apply import apply_plan_
from .calibration import CalibConfig, load_calibration
from .decompose import DECOMPOSITIONS, Factors, decompose, work
from .models import LoadedModel, Target, count_params, find_targets, weight_of
from . import distributed, onload
from .onload import onloaded
from .placement import Placement, WholeOnRead
from .plan import RankPlan
from .selectors import SelectionContext, get_selector
from .stats import collect_stats

Progress = Callable[[Iterable], Iterable]


@dataclass
class Decomposed:
    """A model's targets with their factors in one decomposition."""
    targets: list[Target]
    factors: dict[str, Factors]
    decomposition: str
    seconds: float
    stats: dict = field(default_factory=dict)   # kept only when asked (LLRC/ARS need none)
    warnings: list[dict] = field(default_factory=list)   # layers damped or decomposed by SVD
    placement: Placement | None = None    # how the factors are stored (None: float32, on the
                                          # weights' device); learned methods follow it

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t.name: (t.m, t.n) for t in self.targets}

    @property
    def spectra(self) -> dict[str, torch.Tensor]:
        return {n: f.S for n, f in self.factors.items()}


def decompose_model(model, decomposition: str = "svd", windows: torch.Tensor | None = None,
                    *, alpha: float = 0.5, batch_size: int = 8, keep_stats: bool = False,
                    targets: list[Target] | None = None, progress: Progress = lambda it: it,
                    placement: Placement | None = None) -> Decomposed:
    """Factors of every target layer. Data-aware decompositions collect statistics block by
    block and decompose each block as soon as its statistics are complete. With a
    ``placement``, each layer's factors are stored as it says as soon as they exist (dtype,
    device), so no more than one layer's float32 factors are held at a time. In a process
    group of N the work is shared: each process collects the statistics of its share of the
    windows (summed over the group, ``stats.collect_stats``) and each block's layers are
    dealt out by their work (``distributed.deal``, ``decompose.work``): each process
    decomposes its layers of the block, keeps them in the factor dtype until the block is
    done, then each is broadcast from its process (``_dealt``)."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {sorted(DECOMPOSITIONS)}, "
                         f"got {decomposition!r}")
    targets = targets or find_targets(model)
    dec_shape = {t.name: (t.m, t.n) for t in targets}     # in the targets' order
    modules = dict(model.named_modules())
    needs = DECOMPOSITIONS[decomposition].needs
    factors, kept_stats, warnings = {}, {}, []
    t0 = time.time()
    dealt = distributed.active()
    dealt_dtype = placement.factor_dtype if placement is not None else torch.float32
    home = onload.execution_device(model)

    def one(name, st) -> tuple[Factors, bool]:
        """The layer's factors, and whether it fell back to plain SVD."""
        with onloaded(modules[name]):                    # sequential onloading: W visits
            W = weight_of(modules[name]).detach()
            if st is not None and st.degenerate:         # nothing to weigh the input by
                return decompose(W, "svd"), True
            return decompose(W, decomposition, st, alpha=alpha), False

    def run(names, stats):
        if dealt:     # this process's layers of the block first, then every one handed round
            names = [n for n in dec_shape if n in names]   # one order on every process
            owner = dict(zip(names, distributed.deal(
                [work(*dec_shape[n], decomposition) for n in names])))
            mine = {n: _for_dealing(*one(n, stats.get(n)), dealt_dtype) for n in names
                    if owner[n] == distributed.rank()}
            made = lambda n: _dealt(mine.pop(n, None), owner[n], dec_shape[n], dealt_dtype)
        else:         # one layer's float32 factors at a time
            made = lambda n: one(n, stats.get(n))
        for name in names:
            f, fell_back = made(name)
            if fell_back:
                warnings.append({"kind": "degenerate_input", "layer": name,
                                 "fallback": "svd", "message": f"{name}: its input was "
                                 "zero on every calibration token, so "
                                 f"{decomposition} has no statistics to use; it was "
                                 "decomposed by plain SVD instead"})
            if placement is not None:
                f = placement.store(f, home or weight_of(modules[name]).device)
            factors[name] = f
            if factors[name].damping > 0:
                warnings.append({"kind": "damped_gram", "layer": name,
                                 "damping": factors[name].damping,
                                 "message": f"{name}: its Gram matrix was not positive definite "
                                 f"and was damped by {factors[name].damping:.2e} x its mean "
                                 "diagonal; more calibration tokens make this unnecessary"})
            if keep_stats and name in stats:
                kept_stats[name] = stats[name]

    if not needs:
        by_block: dict[int, list[str]] = {}
        for t in targets:
            by_block.setdefault(t.block, []).append(t.name)
        for b in progress(sorted(by_block)):
            run(by_block[b], {})
    else:
        if windows is None:
            raise ValueError(f"decomposition {decomposition!r} needs calibration data (--calib)")
        collect_stats(model, targets, windows, gram="gram" in needs,
                      absmean="absmean" in needs, batch_size=batch_size,
                      on_block=lambda b, stats: run(list(stats), stats), progress=progress)
        missing = [t.name for t in targets if t.name not in factors]
        if missing:
            raise RuntimeError(f"no calibration statistics reached {missing[:3]}")
    return Decomposed(targets, factors, decomposition, time.time() - t0, kept_stats, warnings,
                      placement)


def _for_dealing(f: Factors, fell_back: bool, dt: torch.dtype) -> list[torch.Tensor]:
    """What ``_dealt`` sends of a layer: ``U`` and ``V`` in the factor dtype ``dt`` (the
    placement's, as it stores them: half the float32 bytes wait in bf16), ``S`` in float32,
    and the damping and fallback."""
    return [f.U.to(dt), f.S.float(), f.V.to(dt),
            torch.tensor([f.damping, float(fell_back)], dtype=torch.float64)]


def _dealt(sent: list[torch.Tensor] | None, owner: int, shape: tuple[int, int],
           dt: torch.dtype) -> tuple[Factors, bool]:
    """A layer's factors from ``owner``, the process that decomposed it (``sent``:
    ``_for_dealing`` there, ``None`` elsewhere), on every process (collective)."""
    m, n = shape
    r = min(m, n)
    if sent is None:
        sent = [torch.empty(m, r, dtype=dt), torch.empty(r), torch.empty(r, n, dtype=dt),
                torch.empty(2, dtype=torch.float64)]
    U, S, V, meta = distributed.broadcast(sent, owner)
    return Factors(U, S, V, float(meta[0])), bool(meta[1])


def make_context(model, dec: Decomposed, windows=None, **kw) -> SelectionContext:
    return SelectionContext(dec.shapes, dec.spectra, count_params(model), dec.decomposition,
                            dec.factors, model, windows, dec.stats, placement=dec.placement,
                            **kw)


def method_config(method: str, decomposition: str, **options):
    """The validated config of ``method`` from ``options``, refusing a (selection,
    decomposition) pair the method does not support: cheap, so entry points call it before
    any heavy work."""
    spec = get_selector(method)
    cfg = spec.config.from_dict(options)
    spec.check(cfg.selection, decomposition)
    return cfg


def select_plan(model, dec: Decomposed, method: str, windows=None, callback=None,
                should_stop=lambda: False, cache_dir=None, checkpoint=None,
                checkpoint_every: int = 50, mask_every: int = 10, **options) -> RankPlan:
    """Run selector ``method`` with its config built from ``options`` (validated). The other
    arguments are plumbing (``SelectionContext``): events, stop, caches, checkpoints."""
    cfg = method_config(method, dec.decomposition, **options)
    ctx = make_context(model, dec, windows, callback=callback, should_stop=should_stop,
                       cache_dir=cache_dir, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, mask_every=mask_every)
    return get_selector(method).select(ctx, cfg)


def select_voted(model, dec: Decomposed, method: str, windows, seeds: tuple[int, ...],
                 callback=None, should_stop=lambda: False, checkpoint=None,
                 **options) -> RankPlan:
    """``select_plan`` once per seed of ``seeds`` (the method's ``seed`` option), then the vote
    of their plans (``vote.py``). Each seed's events carry ``seed`` and its checkpoint is its
    own file (``CHECKPOINT.seedN``); the one ``done`` event is the vote's. A stop during a
    seed returns that seed's partial plan (``meta["stopped"]``): a vote needs every seed."""
    from .vote import vote_plans
    if not get_selector(method).trains:
        raise ValueError(f"a vote of seeds needs a method that trains (llrc, ars, ara); "
                         f"{method} is deterministic: drop the seeds")
    emit = callback or (lambda e: None)
    plans = []
    for seed in seeds:
        def tagged(e: dict, seed=seed) -> None:
            if e.get("type") != "done":
                emit({**e, "seed": seed})
        plan = select_plan(model, dec, method, windows, tagged, should_stop,
                           checkpoint=f"{checkpoint}.seed{seed}" if checkpoint else None,
                           **{**options, "seed": seed})
        if plan.meta.get("stopped") or should_stop():
            return plan
        plans.append(plan)
    voted = vote_plans(plans)
    voted.meta.update(vote_seeds=list(seeds), seconds=sum(p.meta.get("seconds", 0.0)
                                                          for p in plans))
    emit({"type": "done", "step": max(p.meta.get("steps", 0) for p in plans),
          "plan": voted.to_dict(), "stopped": False})
    return voted


def calibrate(loaded: LoadedModel, source: str, n_samples: int = 32, seq_len: int = 256,
              seed: int = 0) -> torch.Tensor:
    from .models import context_length
    seq_len = min(seq_len, context_length(loaded.model))
    return load_calibration(loaded.tokenizer, CalibConfig(source, n_samples, seq_len, seed),
                            loaded.model)


def full_rank_windows(model, seq_len: int, minimum: int = 16) -> int:
    """Calibration windows of ``seq_len`` tokens enough for every target's input Gram
    (``n x n``, one row per token) to be full rank with a 25 % margin: ``ceil(1.25 n_max /
    seq_len)``, at least ``minimum``. Fewer tokens than inputs leave the whitening Gram
    singular (damped, reported as a warning)."""
    from .models import find_targets
    widest = max(t.n for t in find_targets(model))
    return max(minimum, -(-5 * widest // (4 * seq_len)))


def spectra_rows(dec: Decomposed) -> list[dict]:
    """A row per layer per singular value: layer, module type, block, index, sigma, energy."""
    rows = []
    for t in dec.targets:
        s = dec.factors[t.name].S.double().cpu()
        energy = cumulative_energy(s)
        rows.extend({"layer": t.name, "module_type": t.kind, "block": t.block, "index": i,
                     "sigma": float(s[i]), "cumulative_energy": float(energy[i])}
                    for i in range(s.numel()))
    return rows


def compress_(model, dec: Decomposed, plan: RankPlan, release: bool = False):
    """Apply ``plan`` with the factors of ``dec`` (in place; ``apply.restore_`` undoes it).
    ``release``: drop each layer's factors from ``dec`` once it is applied. Sharded factors
    are gathered one layer at a time as they are applied (every process applies alike)."""
    sharded = dec.placement is not None and dec.placement.sharded
    return apply_plan_(model, plan, WholeOnRead(dec.factors) if sharded else dec.factors,
                       release=release)
