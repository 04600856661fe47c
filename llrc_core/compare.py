"""The comparison runner: methods x ratios x selections x decompositions on one model.

Every cell is selected with ``select_plan`` by method name (so any registered selector plugs
in), applied, evaluated and undone; its result is written to ``OUT/cells/<cell>.json`` at
once, so an interrupted run resumes where it stopped. A cached cell is reused when its
fingerprint (model, calibration, evaluation, tasks and that method's options) matches; when
only the evaluation changed (windows, tasks), its stored plan is re-applied and re-evaluated
without selecting again.
At the end the cells are gathered into a tidy ``results.csv`` / ``results.json`` and two
plotly figures: ``ppl_vs_ratio.html`` and ``ranks_heatmap.html`` (methods x layers), written by
``report.py``.

Axes that do not apply to a method are skipped, not faked:
* selection: ``any-k`` only for methods whose registration offers it (LLRC, ARS); others
  top-k.
* decomposition: ``auto`` runs each method on the one it prefers (the registry's
  ``preferred``); a method registered for some decompositions only (``svdllm``: whitening)
  is skipped on the others.
* seed: a method that trains (LLRC, ARS, ARA) runs once per seed of ``seeds`` (its ``seed``
  option: initialisation, noise, batch order), each seed its own cached cell; a method that
  does not train is deterministic and runs once. ``report.summary`` gives mean and sd.
* vote: with ``vote`` and two or more seeds, a learned cell also gets the vote of its seeds'
  plans (``vote.py``: the values most seeds keep, on the same budget), a cell of its own
  evaluated after them; it selects nothing new.
Causal LMs are scored by perplexity (and zero-shot accuracy with ``tasks``); an encoder
(MiniLM) by embedding fidelity (``fidelity.py``) in the ``fidelity`` column.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ConfigMixin, option
from .counting import check_ratio, check_scope
from .decompose import DECOMPOSITIONS
from .errors import Stopped
from .evaluate import EVAL_SAMPLES, EVAL_SEQ_LEN, EVAL_WINDOWS
from .files import atomic_json
from .selectors.base import SELECTIONS
from .session import Session
from .zeroshot import DEFAULT_DATA_DIR

WIKI = DEFAULT_DATA_DIR / "wikitext-2"


@dataclass
class CompareConfig(ConfigMixin):
    model: str = option("assets/demo-model", "model folder, Hub id, or 'minilm' (PyPI package)")
    methods: tuple = option((), "selector names; empty = every registered method")
    ratios: tuple = option((0.9, 0.8, 0.6), "target parameter ratios")
    selections: tuple = option(("top-k", "any-k"), "any-k is used only where a method supports it")
    decompositions: tuple = option(("auto",), "'auto' (each method's own) or registered "
                                "decompositions (svd, asvd, whiten, ...)")
    scope: str = option("linear", "ratio scope: linear (target layers) or model")
    calib: str = option(str(WIKI / "valid.txt"), "calibration text")
    n_calib: int | None = option(None, "calibration windows (None: enough for every target's "
                                 "input Gram to be full rank, at least 16)")
    seq_len: int = option(128, "tokens per calibration window")
    eval_text: str = option(str(WIKI / "test.txt"), "perplexity / fidelity text")
    eval_seq_len: int = option(EVAL_SEQ_LEN, "tokens per evaluation window")
    max_eval_windows: int | None = option(EVAL_WINDOWS, "evaluation windows (None: whole text)")
    eval_sample: str = option("first", "which evaluation windows when capped: 'first' (the "
                              "text's first ones) or 'spread' (evenly over the whole text)")
    fidelity_lines: int = option(256, "WikiText lines embedded for encoder fidelity")
    tasks: tuple = option((), "zero-shot tasks (zeroshot.TASKS); causal LMs only")
    task_limit: int | None = option(None, "docs per task (quick runs)")
    options: dict = option({}, "{method: {field: value}}; key '*' applies where the field exists")
    batch_size: int = option(8, "windows per forward pass")
    device: str | None = option(None, "cuda / cpu (default: cuda when present)")
    seed: int = option(0, "calibration seed")
    seeds: tuple = option((0,), "seeds of the methods that train: one cell per seed (mean and "
                          "sd in summary.csv); methods that do not train run once")
    allow_compressed: bool = option(False, "an LLRC export as the model: loaded dense (A B "
                                    "multiplied back) and compressed again")
    refit: bool = option(False, "refit each plan's output factors to the compressed model's "
                         "inputs before evaluating it (refit.py): a new evaluation of the "
                         "stored plans, not a new selection")
    refit_windows: int = option(0, "with refit: fit on this many fresh windows of the "
                                "calibration text (refit.refit_windows); 0: on the calibration "
                                "windows")
    vote: bool = option(False, "also evaluate, per learned cell with 2+ seeds, the vote of its "
                        "seeds' plans (vote.py): no new selection")
    polish: int = option(0, "rounds of polish.py on every selected plan (0: off; "
                         "windows and moves at PolishConfig's defaults): a new selection")

    def __post_init__(self):
        for name in ("methods", "ratios", "selections", "decompositions", "tasks", "seeds"):
            v = getattr(self, name)
            setattr(self, name, tuple(v.split(",")) if isinstance(v, str) else tuple(v))
        self.ratios = tuple(check_ratio(float(r)) for r in self.ratios)
        try:
            self.seeds = tuple(dict.fromkeys(int(x) for x in self.seeds))
        except ValueError:
            raise ValueError(f"seeds must be integers, e.g. seeds=[0, 1, 2]; got {self.seeds}")
        if not self.seeds:
            raise ValueError("give at least one seed, e.g. seeds=[0]")
        if self.refit_windows < 0 or (self.refit_windows and not self.refit):
            raise ValueError(f"refit_windows ({self.refit_windows}) is how many fresh windows "
                             "the refit takes: 0 or more, and with refit on")
        check_scope(self.scope)
        bad = set(self.selections) - set(SELECTIONS)
        if bad or not self.selections:
            raise ValueError(f"selections must be among {SELECTIONS}, got {self.selections}")
        bad = set(self.decompositions) - {"auto", *DECOMPOSITIONS}
        if bad or not self.decompositions:
            raise ValueError(f"decompositions must be 'auto' or among {tuple(DECOMPOSITIONS)}, "
                             f"got {sorted(bad)}")
        if not self.ratios:
            raise ValueError("give at least one ratio, e.g. ratios=[0.8]")
        if self.eval_sample not in EVAL_SAMPLES:
            raise ValueError(f"eval_sample must be one of {EVAL_SAMPLES}, got "
                             f"{self.eval_sample!r}")
        if min(self.n_calib or 1, self.seq_len, self.eval_seq_len, self.batch_size) < 1:
            raise ValueError("n_calib, seq_len, eval_seq_len and batch_size must be >= 1")
        if self.polish < 0:
            raise ValueError(f"polish is a number of rounds (0: off), got {self.polish}")



# --------------------------------------------------------------------------- the grid
def method_axes(name: str, cfg: CompareConfig) -> list[tuple[str, str]]:
    """``(decomposition, selection)`` pairs to run for method ``name``: the registry says
    what it supports; ``auto`` is its preferred decomposition."""
    from .selectors import get_selector
    spec = get_selector(name)
    sels = [s for s in cfg.selections if s in spec.selections] or [spec.selections[0]]
    decs = []
    for d in cfg.decompositions:
        d = spec.resolve(d)
        if d in spec.allowed_decompositions and d not in decs:
            decs.append(d)
    return [(d, s) for d in decs for s in sels]


def method_options(name: str, cfg: CompareConfig) -> dict:
    from .selectors import get_selector
    names = {f.name for f in dataclasses.fields(get_selector(name).config)}
    opts = {k: v for k, v in cfg.options.get("*", {}).items() if k in names}
    opts.update(cfg.options.get(name, {}))
    return opts


def grid(cfg: CompareConfig) -> list[dict]:
    from .selectors import SELECTORS, get_selector
    methods = cfg.methods or tuple(sorted(SELECTORS))
    cells = []
    for m in methods:
        seeds = cfg.seeds if get_selector(m).trains else (None,)
        for dec, sel in method_axes(m, cfg):
            for r in cfg.ratios:
                cell = {"method": m, "decomposition": dec, "selection": sel,
                        "target_ratio": r}
                for seed in seeds:
                    cells.append(cell if seed is None else {**cell, "seed": seed})
                if cfg.vote and len(seeds) > 1 and None not in seeds:
                    cells.append({**cell, "vote": vote_key(seeds)})
    return cells


def vote_key(seeds) -> str:
    """A vote cell's ``vote`` field: the seeds it votes over, ``0,1,2``."""
    return ",".join(map(str, seeds))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_id(cell: dict) -> str:
    seed = (f"__seed{cell['seed']}" if "seed" in cell else
            f"__vote{cell['vote'].replace(',', '-')}" if "vote" in cell else "")
    return (f"{cell['method']}__{cell['decomposition']}__{cell['selection']}__"
            f"{cell['target_ratio']:g}{seed}")


EVAL_FIELDS = ("eval_text", "eval_seq_len", "max_eval_windows", "eval_sample",
               "fidelity_lines", "tasks", "task_limit", "refit", "refit_windows")
#: Fields added after grids were cached: fingerprinted only away from these values, so the
#: cells of a grid cached before a field existed stay valid.
LATER_FIELDS = {"refit": False, "eval_sample": "first", "polish": 0, "refit_windows": 0}
#: What only a plan depends on: the dense cell (no plan) leaves them out, so turning refit or
#: polish on does not evaluate dense again.
PLAN_FIELDS = ("refit", "refit_windows", "polish")


def _fingerprint(cfg: CompareConfig, method: str, skip: tuple = ()) -> str:
    skip += PLAN_FIELDS if method == "dense" else ()
    common = {k: v for k, v in cfg.to_dict().items()
              if k not in ("methods", "ratios", "selections", "decompositions", "options",
                           "device", "batch_size", "allow_compressed", "seeds", "vote") + skip
              and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    return _hash({"common": common, "options": method_options(method, cfg)
                   if method != "dense" else {}})


def fingerprint(cfg: CompareConfig, method: str) -> str:
    """What a cell's row depends on: model, calibration, scope, the method's options and the
    evaluation."""
    return _fingerprint(cfg, method)


def select_fingerprint(cfg: CompareConfig, method: str) -> str:
    """What a cell's plan depends on: the same without the evaluation fields."""
    return _fingerprint(cfg, method, EVAL_FIELDS)


# --------------------------------------------------------------------------- running
def run_cell(s: Session, cell: dict, emit: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] = lambda: False, reuse: dict | None = None) -> dict:
    """Select (or, with ``reuse``: a cached row of the same selection, take its plan and
    seconds), apply, evaluate and restore the model (``workflow.compress`` in place). A cell
    stopped mid-way raises ``Stopped``: its partial plan is not a result."""
    from .apply import restore_
    from .plan import RankPlan
    from .workflow import compress
    cfg = s.cfg
    dec = s.dec(cell["decomposition"])
    opts = {**method_options(cell["method"], cfg), "ratio": cell["target_ratio"],
            "scope": cfg.scope, "selection": cell["selection"]}
    if "seed" in cell:                      # the seed axis wins over a seed in ``options``
        opts["seed"] = cell["seed"]
    # a reused plan (a cached row's, or a vote of polished plans) is not polished again
    polish, polish_ids = s.polish if reuse is None else (None, None)
    try:
        res = compress(s.loaded.model, dec, cell["method"], s.windows, evaluate=s.evaluate,
                       before=False, plan=RankPlan.from_dict(reuse["plan"]) if reuse else None,
                       partial=False, emit=emit or (lambda e: None), should_stop=should_stop,
                       cache_dir=str(Path(s.out) / "cache"), refit=cfg.refit,
                       refit_windows=s.refit_ids, polish=polish,
                       polish_windows=polish_ids, **opts)
    finally:
        restore_(s.loaded.model)
    plan, ev = res.plan, res.after
    seconds = reuse["seconds"] if reuse else res.select_seconds
    return {**cell, "scope": cfg.scope, "achieved_ratio_linear": plan.ratio("linear"),
            "achieved_ratio_model": plan.ratio("model"), **ev, "seconds": seconds,
            **res.refit, **res.polish,
            "decompose_seconds": dec.seconds, "dense_layers": plan.summary()["dense_layers"],
            "ranks": plan.ranks(), "shapes": {n: [lp.m, lp.n] for n, lp in plan.layers.items()},
            "plan": plan.to_dict()}


def voted(cell: dict, rows: list[dict]) -> dict:
    """The vote of the plans of ``cell``'s seeds among ``rows``, as ``run_cell``'s ``reuse``
    (its seconds: the seeds' selection time together). A missing or failed seed is an error."""
    from .plan import RankPlan
    from .vote import vote_plans
    seeds = [int(x) for x in cell["vote"].split(",")]
    key = {k: v for k, v in cell.items() if k != "vote"}
    found = {r["seed"]: r for r in rows if r.get("seed") in seeds
             and not r.get("error") and r.get("plan") and key == {k: r[k] for k in key}}
    missing = [s for s in seeds if s not in found]
    if missing:
        raise ValueError(f"the vote needs every seed's plan; seed(s) {missing} failed or did "
                         "not run: run the grid again to retry them")
    plans = [RankPlan.from_dict(found[s]["plan"]) for s in seeds]
    return {"plan": vote_plans(plans).to_dict(),
            "seconds": sum(found[s]["seconds"] for s in seeds)}


def run_cells(cfg: CompareConfig, out: str | Path, log: Callable[[str], None] = print,
              retry_errors: bool = True, *,
              make_session: Callable[[], Session] | None = None,
              emit: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False) -> list[dict]:
    """Run (or resume) the grid into ``out/cells``; returns one row per cell, dense first.

    ``emit`` receives ``{"type": "grid", "done", "total", "cell"}`` before each cell, the
    selector's own events during it, and ``{"type": "cell", "row"}`` after it. When
    ``should_stop()`` turns true the grid ends after (or inside) the current cell; a cell cut
    short is not written, so a later run redoes it. ``make_session`` builds the
    ``Session`` (default: load ``cfg.model`` and calibrate); it is called only when a cell is
    not cached.
    """
    from .selectors import get_selector
    for m in cfg.methods:
        get_selector(m)                      # unknown names fail before any work
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_json(out / "config.json", cfg.to_dict())
    emit = emit or (lambda e: None)
    cells = [{"method": "dense", "decomposition": "-", "selection": "-", "target_ratio": 1.0}]
    cells += grid(cfg)
    rows, session = [], None
    for i, cell in enumerate(cells):
        if should_stop():
            break
        emit({"type": "grid", "done": i, "total": len(cells), "cell": cell_id(cell)})
        path = out / "cells" / f"{cell_id(cell)}.json"
        fp, sfp = fingerprint(cfg, cell["method"]), select_fingerprint(cfg, cell["method"])
        reuse = None
        if path.exists():
            row = json.loads(path.read_text())
            if row.get("fingerprint") == fp and not (retry_errors and row.get("error")):
                rows.append(row)
                emit({"type": "cell", "row": row, "cached": True})
                continue
            if row.get("select_fingerprint") == sfp and row.get("plan") and not row.get("error"):
                reuse = row                  # same plan, new evaluation: do not select again
        if "vote" in cell:
            try:
                reuse = voted(cell, rows)
            except ValueError as exc:
                row = {**cell, "scope": cfg.scope, "error": str(exc),
                       "fingerprint": fp, "select_fingerprint": sfp}
                atomic_json(path, row)
                rows.append(row)
                emit({"type": "cell", "row": row, "cached": False, "reselected": False})
                continue
        if session is None:
            log(f"loading {cfg.model}")
            session = make_session() if make_session else Session(cfg, log)
        session.out = out
        log(f"{'evaluating' if reuse else 'running'} {cell_id(cell)}")
        try:
            if cell["method"] == "dense":
                row = {**cell, "scope": cfg.scope, "achieved_ratio_linear": 1.0,
                       "achieved_ratio_model": 1.0, **session.evaluate(), "seconds": 0.0}
            else:
                row = run_cell(session, cell, emit, should_stop, reuse)
        except Stopped:
            break
        except Exception as exc:  # one failing method must not end the grid: record it
            from .apply import restore_
            restore_(session.loaded.model)
            row = {**cell, "scope": cfg.scope, "error": f"{type(exc).__name__}: {exc}"}
            log(f"  {cell_id(cell)} failed: {row['error']}")
        row.update(fingerprint=fp, select_fingerprint=sfp)
        atomic_json(path, row)
        rows.append(row)
        emit({"type": "cell", "row": row, "cached": False, "reselected": reuse is None})
    emit({"type": "grid", "done": len(rows), "total": len(cells)})
    return rows


def run_compare(cfg: CompareConfig, out: str | Path, log: Callable[[str], None] = print,
                retry_errors: bool = True, **kw):
    """Run (or resume) the grid into ``out`` and write the tables and figures; returns the
    tidy results ``DataFrame``. ``kw``: ``make_session``, ``emit``, ``should_stop`` (``run_cells``)."""
    from . import report
    rows = run_cells(cfg, out, log, retry_errors, **kw)
    df = report.tidy(rows)
    report.write_results(df, rows, Path(out))
    return df

