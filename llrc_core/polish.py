"""Polish a plan: move equal-cost chunks of singular values between layers while that lowers
a loss on windows of the calibration text: a causal LM's next-token loss; an encoder's
distance to the dense model's output (``polish_objective``).

A selector spends the budget by its own signal (LLRC: the distance of hidden states on short
calibration windows; SVD-LLM: the same rank everywhere). Polishing checks that spending
against the loss perplexity measures (on an encoder, against what its embedding fidelity
measures). Each round:

1. one forward and backward pass over the windows, the target layers masked as in LLRC's
   training (``masked.py``) with the plan's 0/1 masks, gives the loss's gradient with respect
   to every singular value's gate;
2. to first order, that predicts what each move costs: a chunk of about ``chunk`` parameters
   taken from one layer (its smallest kept singular values) and given to another (its
   largest dropped ones; a prefix stays a prefix);
3. the ``pairs`` most promising moves are evaluated exactly, best first, and each that lowers
   the loss is kept (a layer moves at most once a round: the predictions were made at the
   round's start).

It stops after ``rounds`` rounds or at a round that keeps no move. The plan never grows: a
move may not cost more than the parameters earlier moves freed (on the demo model every move
costs the same). Dense layers (at or above break-even) stay as they are, and no layer is
taken up to break-even. Under ``torchrun`` the processes share the windows and all-reduce
the loss and its gradient, so all of them make the moves one process makes.

Why a search of our own: no library moves ranks between layers by a loss. The first-order
ranking is what makes it affordable, one backward pass and ``pairs`` forward passes a round
instead of a forward pass per layer and direction; measured on the demo model in
``bench/README.md`` ("Polish").
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .counting import break_even
from .plan import LayerPlan, RankPlan
from .selectors.learned import masked_session
from .selectors.llrc import distill_setting
from .selectors.objective import Objective

Kept = dict[str, frozenset]          # layer -> kept singular-value indices (movable layers)


@dataclass
class PolishConfig:
    rounds: int = 12        # at most this many rounds (each: 1 backward + ``pairs`` forwards)
    chunk: int = 15360      # parameters one move takes from a layer and gives to another
    pairs: int = 6          # moves evaluated exactly a round, by predicted gain
    windows: int = 64       # windows of the calibration text the loss is measured on
    seq_len: int = 256      # their tokens (the evaluation's length: 128-token ones transferred
                            # less to held-out text on the demo model)
    batch_size: int = 8     # windows a forward pass

    def __post_init__(self):
        for name in ("rounds", "chunk", "pairs", "windows", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"polish {name} must be >= 1, got {getattr(self, name)}")

        if int(self.seq_len) < 2:
            raise ValueError(f"polish seq_len must be >= 2, got {self.seq_len}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def batch_tokens(self) -> int:
        """Tokens of one forward and backward pass (the memory planner's polish phase)."""
        return min(self.batch_size, self.windows) * self.seq_len


def polish_windows(loaded, source: str, cfg: PolishConfig, seed: int = 0) -> torch.Tensor:
    """The windows ``cfg`` asks for, from the calibration ``source``: (windows, seq_len).
    From a local text, that many non-overlapping windows evenly spread over all of it (as
    ``evaluate.eval_windows(sample="spread")``); from a Hub set or ``selfgen``, seeded random
    ones (``pipeline.calibrate``). On the demo model, spread windows moved more and gave a
    lower held-out perplexity than random ones (one seed; bench/README.md, "Polish")."""
    from .evaluate import eval_windows
    from .models import context_length
    from .pipeline import calibrate
    seq_len = min(cfg.seq_len, context_length(loaded.model))
    if Path(source).expanduser().exists():     # (one read; calibrate checks any other source)
        return eval_windows(loaded.tokenizer, source, seq_len, cfg.windows, "spread")
    return calibrate(loaded, source, cfg.windows, seq_len, seed)


def polish_report(plan: RankPlan) -> dict:
    """A report's polish fields, from the plan itself (``meta["polish"]``): ``polish`` (the
    config, or None) and, when polished, its loss before and after, moves and seconds. Read
    from the plan, a stored polished plan evaluated again reports them too."""
    p = plan.meta.get("polish")
    if p is None:
        return {"polish": None}
    return {"polish": {f.name: p[f.name] for f in fields(PolishConfig)},
            "polish_loss_before": p["loss_before"], "polish_loss_after": p["loss_after"],
            "polish_moves": p["moves"], "polish_seconds": p["seconds"]}


# --- moves (pure: indices and counts) -------------------------------------------------------
def chunk_of(m: int, n: int, chunk: int) -> int:
    """Singular values a move shifts in an ``m x n`` layer: the nearest count to ``chunk``
    parameters, at least one."""
    return max(1, round(chunk / (m + n)))


def grown(kept: frozenset, S: torch.Tensor, c: int) -> frozenset:
    """``kept`` with its ``c`` largest dropped singular values added."""
    out = [i for i in torch.argsort(S, descending=True).tolist() if i not in kept]
    return kept | frozenset(out[:c])


def shrunk(kept: frozenset, S: torch.Tensor, c: int) -> frozenset:
    """``kept`` without its ``c`` smallest singular values."""
    return kept - frozenset(sorted(kept, key=lambda i: float(S[i]))[:c])


def moves(kept: Kept, shapes: dict, spectra: dict, chunk: int):
    """Per movable layer: the grown and the shrunk set, where allowed, with the move's size in
    parameters: ``(grow, shrink)``, each ``{name: (new set, params)}``."""
    grow, shrink = {}, {}
    for name, k in kept.items():
        m, n = shapes[name]
        c = chunk_of(m, n, chunk)
        if len(k) + c < break_even(m, n):
            grow[name] = (grown(k, spectra[name], c), c * (m + n))
        if len(k) > c:
            shrink[name] = (shrunk(k, spectra[name], c), c * (m + n))
    return grow, shrink


def ranked_pairs(grad: dict, kept: Kept, grow: dict, shrink: dict, slack: int):
    """Moves ``(predicted loss change, from, to)``, best first: the loss's first-order change
    when ``from`` drops its chunk and ``to`` takes one (a gate's gradient is the loss's change
    per unit of gate, so dropping value i changes it by ``-g_i`` and adding it by ``+g_i``).
    Only moves the freed parameters pay for, and only those predicted to lower the loss."""
    def change(name, new):
        g = grad[name]
        added = sorted(new - kept[name])
        removed = sorted(kept[name] - new)
        return float(g[added].sum()) - float(g[removed].sum())
    up = {n: change(n, s) for n, (s, _) in grow.items()}
    down = {n: change(n, s) for n, (s, _) in shrink.items()}
    pairs = [(down[i] + up[j], i, j) for i in shrink for j in grow
             if i != j and grow[j][1] <= shrink[i][1] + slack]
    return sorted(p for p in pairs if p[0] < 0)


# --- the search (model, windows) ------------------------------------------------------------
def polish_objective(model, windows: torch.Tensor, batch_size: int) -> Objective:
    """What polish lowers (the learned selectors' ``Objective``, built from the dense model):
    a causal LM's next-token loss, the quantity perplexity measures; for an encoder, which
    has none, the distance of its output to the dense model's, by the cosine of mean-pooled
    spans of the last state (what a sentence encoder outputs: LLRC's encoder default,
    ``distill_setting``; a causal LM's distance is unused)."""
    return Objective(model, windows, "auto", batch_size,
                     distance=distill_setting(model, "auto", "auto")[1])


def _masks(layers: dict, kept: Kept, grad: bool = False) -> None:
    """Each movable layer computes with ``kept``'s values: by a 0/1 mask where the gradient
    is wanted; else by those values alone (``MaskedLowRank.keep_only``: the cost of the kept
    rank, not the full one)."""
    for name, layer in layers.items():
        layer.keep_only(None)
        if name not in kept:
            layer.mask = None                                  # dense: every value kept
            continue
        if not grad and layer.keep_only(kept[name]):
            layer.mask = None
            continue
        mask = torch.zeros(layer.rank, device=layer.S.device, dtype=layer.S.dtype)
        mask[list(kept[name])] = 1.0
        layer.mask = mask.requires_grad_(grad)


def _loss(layers: dict, kept: Kept, objective, n: int, batch_size: int,
          grad: bool = False) -> tuple[float, dict]:
    """Mean loss over the ``n`` windows of ``objective`` with the layers masked as ``kept``
    says, and, with ``grad``, its gradient with respect to every movable layer's mask."""
    _masks(layers, kept, grad)
    world, total = distributed.world_size(), 0.0
    with torch.set_grad_enabled(grad):
        # under torchrun each process takes its part of every global batch (the same number
        # of passes on every rank, as sharded factors need; ``Objective`` weights its part by
        # its share), and the sums are all-reduced
        for batch in torch.arange(n).split(batch_size * world):
            loss = objective(batch) * (len(batch) / (n * world))
            if grad:
                loss.backward()
            total += float(loss.detach())
    grads = {name: layers[name].mask.grad.detach().float().cpu() for name in kept} \
        if grad else {}
    _masks(layers, {})
    return distributed.sum_(list(grads.values()), total), grads


def polish_plan(model, dec, plan: RankPlan, windows: torch.Tensor, cfg: PolishConfig,
                emit: Callable[[dict], None] = lambda e: None,
                should_stop: Callable[[], bool] = lambda: False) -> RankPlan:
    """``plan`` with singular values moved between layers while that lowers the polish loss
    (``polish_objective``) on ``windows`` (n, L) (module docstring). ``model`` is dense;
    ``dec`` holds the factors ``plan`` indexes. The result keeps ``plan``'s method,
    decomposition and selection; ``meta["polish"]`` records the loss before and after, the
    moves and the config. When ``should_stop()`` turns true the search ends before its next
    exact check, with the moves kept so far (``stopped``): every plan it holds is whole and
    within the budget."""
    if windows is None or windows.shape[1] < 2:
        raise ValueError("polish needs calibration windows of at least 2 tokens")
    world = distributed.world_size()
    last = windows.shape[0] % (cfg.batch_size * world)       # a process must get a window
    if 0 < last < world:
        raise ValueError(f"polish's {windows.shape[0]} windows leave a last batch of {last} "
                         f"for {world} processes: use a multiple of {world} windows "
                         "(--polish-windows)")
    missing = [n for n in plan.layers if n not in dec.factors]
    if missing:
        raise ValueError(f"polish needs the factors the plan indexes; missing {missing[:3]}")
    t0 = time.time()
    shapes = {n: (lp.m, lp.n) for n, lp in plan.layers.items()}
    spectra = {n: dec.factors[n].S.float().cpu() for n in plan.layers}
    kept: Kept = {n: frozenset(lp.kept) for n, lp in plan.layers.items() if not lp.dense}
    slack, done, history = 0, 0, []
    # made before the masks: an encoder's targets are the dense model's states
    objective = polish_objective(model, windows, cfg.batch_size)
    count = windows.shape[0]
    with masked_session(model, {n: dec.factors[n] for n in plan.layers}, dec.placement) as layers:
        base, _ = _loss(layers, kept, objective, count, cfg.batch_size)
        start = base
        emit({"type": "phase", "phase": "polish"})
        for rnd in range(cfg.rounds):
            if should_stop():
                break
            _, grad = _loss(layers, kept, objective, count, cfg.batch_size, grad=True)
            grow, shrink = moves(kept, shapes, spectra, cfg.chunk)
            touched, tried, kept_moves = set(), 0, 0
            for _, i, j in ranked_pairs(grad, kept, grow, shrink, slack):
                if tried >= cfg.pairs or should_stop():
                    break
                if i in touched or j in touched or grow[j][1] > shrink[i][1] + slack:
                    continue                   # (slack: what this round's moves left over)
                trial = {**kept, i: shrink[i][0], j: grow[j][0]}
                tried += 1
                loss, _ = _loss(layers, trial, objective, count, cfg.batch_size)
                if loss < base:
                    kept, base = trial, loss
                    slack += shrink[i][1] - grow[j][1]
                    touched |= {i, j}
                    kept_moves += 1
            done += kept_moves
            history.append({"round": rnd, "tried": tried, "moves": kept_moves, "loss": base})
            emit({"type": "polish", "round": rnd, "tried": tried, "moves": kept_moves,
                  "loss": base})
            if kept_moves == 0:
                break
    layers_out = {n: lp if n not in kept else LayerPlan(lp.m, lp.n, sorted(kept[n]))
                  for n, lp in plan.layers.items()}
    meta = {**plan.meta, "polish": {**cfg.to_dict(), "loss_before": start, "loss_after": base,
                                    "moves": done, "rounds_run": len(history),
                                    "stopped": bool(should_stop()),
                                    "history": history,
                                    "window_shape": list(windows.shape),
                                    "seconds": time.time() - t0}}
    return RankPlan(layers_out, plan.total_params, plan.method, plan.decomposition,
                    plan.selection, meta)
