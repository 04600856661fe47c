"""Command-line interface: ``llrc`` / ``python -m llrc_core``. A thin face over the library."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .cli_parser import build_parser
from .errors import LLRCError
from .files import atomic_write, prepare_destination


def _bar(desc: str):
    return lambda it: tqdm(it, desc=desc, leave=False)


def _stored_dense(args, model, plan, already=None):
    """The layers to store dense under ``--dense-below`` (timed here), told on stderr."""
    from .speed import choose_stored_dense
    if not args.dense_below:
        return already
    dense = choose_stored_dense(model, plan, args.dense_below, already=already)
    print(f"note: {dense.describe(plan)}", file=sys.stderr)
    return dense


def _load(args, memory=None):
    """The model as the memory plan places it: in CPU memory, onloaded one layer at a time
    (``--offload weights``), its blocks across GPUs (``--gpus N``), or on ``--device``."""
    from .models import load_model
    from .onload import load_sequential
    from .spread import placed
    kw = dict(trust_remote_code=args.trust_remote_code, allow_compressed=args.allow_compressed)
    if memory is not None and memory.placement.offload_weights:
        return load_sequential(args.model, args.device, args.dtype, **kw)
    if memory is not None and memory.gpus > 1:
        kw["device_map"] = placed(memory.facts)
    return load_model(args.model, args.device, args.dtype, **kw)


def _decompose(args, loaded, placement=None):
    from .pipeline import calibrate, decompose_model
    windows = None
    if args.calib:
        windows = calibrate(loaded, args.calib, args.n_calib, args.seq_len, args.seed)
    elif args.decomposition != "svd":
        raise LLRCError(f"--decomposition {args.decomposition} needs calibration data: pass "
                        "--calib FILE (or 'selfgen')")
    dec = decompose_model(loaded.model, args.decomposition, windows, alpha=args.alpha,
                          batch_size=args.batch_size, progress=_bar("decompose blocks"),
                          placement=placement)
    return dec, windows


def _polish_config(args):
    """``compress --polish``: its config (checked before anything loads), or None."""
    from .polish import PolishConfig
    if args.polish == 0:
        return None
    try:
        return PolishConfig(rounds=args.polish, windows=args.polish_windows,
                            seq_len=args.polish_seq_len)
    except ValueError as exc:
        raise LLRCError(f"{exc}; e.g. --polish 12, or 0 for none") from exc


def _check_refit_windows(args) -> None:
    """``compress --refit-windows``: a count, and only with ``--refit`` (else it would be
    ignored)."""
    if args.refit_windows < 0:
        raise LLRCError(f"--refit-windows takes 0 (the calibration windows) or more; got "
                        f"{args.refit_windows}")
    if args.refit_windows and not args.refit:
        raise LLRCError("--refit-windows sets the windows --refit fits on: add --refit, or "
                        "drop --refit-windows")


def _polish_windows(args, cfg, loaded):
    """The polish's windows of the calibration text (None without --polish)."""
    from .polish import polish_windows
    return None if cfg is None else polish_windows(loaded, args.calib, cfg, args.seed)


def cmd_spectra(args) -> dict:
    import pandas as pd
    from .pipeline import spectra_rows
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{str(out)!r} exists; choose another file or pass --force")
    loaded = _load(args)
    dec, _ = _decompose(args, loaded)
    df = pd.DataFrame(spectra_rows(dec))
    atomic_write(out, lambda tmp: df.to_csv(tmp, index=False))
    return {"rows": len(df), "layers": len(dec.targets), "out": str(out)}


def _parse_opt(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key with ``_`` for ``-``, the value as JSON, else as a string)."""
    key, _, value = item.partition("=")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _method_options(args) -> dict:
    return {"ratio": args.ratio, "scope": args.ratio_scope, "selection": args.selection,
            **dict(_parse_opt(item) for item in args.opt or [])}


class _EventBar:
    """Renders a selector's step events as a progress bar with ratio, loss and phase."""

    def __init__(self, method: str):
        self.method, self.bar = method, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: dict) -> None:
        if event.get("type") == "polish":
            tqdm.write(f"polish round {event['round']}: {event['moves']} of {event['tried']} "
                       f"moves kept, loss {event['loss']:.4f}", file=sys.stderr)
        if event.get("type") != "step":
            return
        if self.bar is None:   # a total (steps at most) gives the bar its time left
            self.bar = tqdm(desc=self.method, unit="step", leave=False,
                            total=event.get("total_steps"))
        self.bar.update(1)
        post = {"ratio": f"{event.get('ratio_linear', float('nan')):.4f}",
                "loss": f"{event.get('loss', float('nan')):.4f}"}
        if "phase" in event:
            post["phase"] = event["phase"]
        self.bar.set_postfix(post, refresh=False)


def cmd_compress(args) -> dict | None:
    """Compress and export. Under ``torchrun`` every process trains on its share of each
    batch (``distributed``); only rank 0 evaluates, logs and writes the folder."""
    from . import distributed
    from .evaluate import eval_info, eval_windows
    from .events import JsonlLog, fan_out
    from .export import export_info, export_model
    from .onload import disable_
    from .preflight import check_compress
    from .refit import refit_windows
    from .selectors import get_selector
    from .speed import stored_summary
    from .workflow import compress

    opts = _method_options(args)
    args.decomposition = get_selector(args.method).resolve(args.decomposition)
    main = not distributed.init_from_env() or distributed.is_main()
    if args.shard_factors and not get_selector(args.method).trains:
        raise LLRCError(f"--shard-factors splits the factors that masks train on; {args.method} "
                        "trains none: use a learned method (llrc, ars, ara) or drop it")
    vote_seeds = _vote_seeds(args)
    polish = _polish_config(args)
    _check_refit_windows(args)
    if args.shard_factors and distributed.world_size() < 2:
        raise LLRCError("--shard-factors splits the factors over processes: launch with "
                        "torchrun --nproc_per_node N (N > 1), or drop --shard-factors")
    # Everything checkable without weights fails here, before loading (seconds, not minutes).
    early, memory = check_compress(
        args.model, args.method, args.decomposition, opts, calib=args.calib,
        n_calib=args.n_calib, seq_len=args.seq_len, out=args.out, force=args.force,
        eval_text=args.eval_text, trust_remote_code=args.trust_remote_code, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, allow_compressed=args.allow_compressed,
        offload=args.offload, factor_dtype=args.factor_dtype, max_shard_size=args.max_shard_size,
        shard_over=distributed.world_size() if args.shard_factors else 1, gpus=args.gpus,
        refit=args.refit, refit_windows=args.refit_windows, polish=polish)
    t0 = time.time()
    loaded = _load(args, memory)
    polish_ids = _polish_windows(args, polish, loaded)
    refit_ids = refit_windows(loaded, args.calib, args.refit_windows, args.seq_len, args.seed)
    dec, windows = _decompose(args, loaded, memory.placement)
    ev = None
    if args.eval_text and main:
        from .models import context_length   # windows longer than the context crash
        ev = eval_windows(loaded.tokenizer, args.eval_text,
                          min(args.eval_seq_len, context_length(loaded.model)),
                          args.max_eval_windows, args.eval_sample)
    resuming = bool(args.checkpoint) and Path(args.checkpoint).exists()
    log = JsonlLog(args.log, append=resuming) if args.log and main else None
    with _EventBar(args.method) as bar:
        res = compress(loaded.model, dec, args.method, windows, eval_ids=ev,
                       emit=fan_out(bar, log) if main else (lambda e: None),
                       eval_batch_size=args.batch_size, release_factors=True,
                       refit=args.refit, refit_windows=refit_ids, vote_seeds=vote_seeds,
                       polish=polish,
                       polish_windows=polish_ids, checkpoint=args.checkpoint, **opts)
    if not main:                      # the same plan as rank 0's; rank 0 writes it
        distributed.barrier()
        return None
    report = {"model": args.model, "method": args.method, "decomposition": args.decomposition,
              "selection": args.selection, "target_ratio": args.ratio,
              "ratio_scope": args.ratio_scope, **res.plan.summary(),
              **({**res.metrics, **eval_info(ev, args.eval_text, args.eval_sample)}
                 if ev is not None else {}),
              "stopped": res.stopped, "select_seconds": res.select_seconds,
              **res.refit, **res.polish,
              **({"vote_seeds": list(vote_seeds)} if vote_seeds else {}),
              "seconds": time.time() - t0, "placement": memory.placement.to_dict(),
              "warnings": [*early, *res.warnings]}
    disable_(loaded.model)                      # sequentially onloaded: all in CPU memory
    export_model(loaded.model, loaded.tokenizer, res.plan, args.out, report=report,
                 force=args.force, merged_dense=args.merged_dense,
                 dtype=loaded.source_dtype, source=loaded.source_info(),
                 dense=None if args.merged_dense else _stored_dense(args, loaded.model, res.plan),
                 max_shard_size=args.max_shard_size)
    _print_warnings(report["warnings"])
    distributed.barrier()
    return {k: v for k, v in report.items() if k not in ("ranks", "warnings")} | {
        "out": args.out, "warnings": len(report["warnings"]),
        **stored_summary(export_info(args.out))}


def _vote_seeds(args) -> tuple[int, ...]:
    """``--vote-seeds`` as distinct integers (two or more, a method that trains), or ()."""
    from .selectors import get_selector
    if not args.vote_seeds:
        return ()
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in args.vote_seeds.split(",")))
    except ValueError:
        raise LLRCError(f"--vote-seeds takes integers, e.g. --vote-seeds 0,1,2; got "
                        f"{args.vote_seeds!r}")
    if len(seeds) < 2:
        raise LLRCError("--vote-seeds needs two or more seeds (e.g. 0,1,2); for one seed use "
                        "--opt seed=N")
    if not get_selector(args.method).trains:
        raise LLRCError(f"--vote-seeds votes over the plans of a method that trains (llrc, "
                        f"ars, ara); {args.method} is deterministic: drop --vote-seeds")
    return seeds


def _print_warnings(warnings: list[dict]) -> None:
    """The run's warnings as the CLI's last lines (stderr; also in report.json)."""
    for w in warnings:
        print(f"warning: {w['message']}", file=sys.stderr)


def cmd_export(args) -> dict:
    """Re-export an LLRC folder (e.g. ``--merged-dense`` or another ``--dtype``), or compress
    ``--model`` with a saved ``--plan`` (its decomposition) and export it."""
    from .export import (export_info, export_kind, export_model, load_compressed,
                         recorded_source, stored_dense_of)
    from .speed import stored_summary
    from .pipeline import compress_
    from .plan import RankPlan

    prepare_destination(Path(args.out), args.force)
    src, kind = Path(args.model), export_kind(args.model)
    if kind == "merged" and not args.plan:
        raise LLRCError(f"{args.model!r} is a merged-dense export (every layer dense again): "
                        "re-export from its low-rank folder, or pass --plan to compress it")
    already = None
    if kind == "low-rank":   # stored as --dtype, else as its source was
        model, tok, plan = load_compressed(src, args.device)
        already = stored_dense_of(src)        # its layers stored dense stay dense
        source = recorded_source(src)
        dtype = args.dtype or (source or {}).get("dtype")
        report = json.loads((src / "report.json").read_text()) \
            if (src / "report.json").is_file() else None
    else:
        if not args.plan:
            raise LLRCError(f"{args.model!r} is not an LLRC export folder: pass --plan "
                            "rank_plan.json to compress it with a saved plan")
        plan = RankPlan.load(args.plan)
        args.decomposition = plan.decomposition
        loaded = _load(args)
        dec, _ = _decompose(args, loaded)
        compress_(loaded.model, dec, plan)
        model, tok, report = loaded.model, loaded.tokenizer, {"model": args.model, **plan.summary()}
        source, dtype = loaded.source_info(), args.dtype or loaded.source_dtype
    dense = already if args.merged_dense else _stored_dense(args, model, plan, already)
    out = export_model(model, tok, plan, args.out, report=report, force=args.force,
                       merged_dense=args.merged_dense, dtype=dtype, source=source, dense=dense,
                       max_shard_size=args.max_shard_size)
    storage = export_info(out)["storage"]
    return {"out": args.out, "merged_dense": args.merged_dense,
            "plan_ratio_linear": plan.ratio("linear"), "plan_ratio_model": plan.ratio("model"),
            **stored_summary(export_info(out)), "storage_dtype": storage["dtype"],
            "weights_bytes": storage["weights_bytes"],
            "source_weights_bytes": storage["source"]["weights_bytes"]}


def _refuse_encoder(name: str, model) -> None:
    """``eval`` measures perplexity, which an encoder (no LM head) does not have."""
    from .distill import has_lm_head
    if not has_lm_head(model):
        raise LLRCError(f"{name!r} is an encoder (no LM head), so it has no perplexity; "
                        "score it by embedding fidelity to its dense model instead: llrc "
                        "compress --eval-text (windows) or llrc compare (sentence lines)")


def cmd_eval(args) -> dict:
    from .evaluate import eval_info, eval_windows, perplexity
    from .export import export_kind, load_compressed
    from .models import load_model, pick_device, pick_dtype, skeleton
    if export_kind(args.model):   # computed in the dtype compress computes in (--dtype)
        dev = pick_device(args.device)
        model, tok, _ = load_compressed(args.model, dev, pick_dtype(args.dtype, dev))
        _refuse_encoder(args.model, model)
    else:                         # refused from its config, before any weight is read
        _refuse_encoder(args.model, skeleton(args.model, args.trust_remote_code))
        loaded = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
        model, tok = loaded.model, loaded.tokenizer
    from .models import context_length      # windows longer than the context crash
    ev = eval_windows(tok, args.text, min(args.seq_len, context_length(model)), args.max_windows,
                      args.sample)
    return {**perplexity(model, ev, args.batch_size, progress=_bar("eval")),
            **eval_info(ev, args.text, args.sample)}


def cmd_plan_memory(args) -> dict | None:
    """Bytes per phase of compressing ``--model`` (its config only: no weights are read)."""
    from .planner import plan_memory
    _check_refit_windows(args)
    plan = plan_memory(args.model, args.dtype, args.method, args.decomposition, args.n_calib,
                       args.seq_len, args.batch_size, args.gpus,
                       args.gpu_memory if args.gpus else None,   # a host plan is not checked
                       args.trust_remote_code, offload=args.offload,
                       factor_dtype=args.factor_dtype, shard_over=args.shard_factors,
                       processes=args.processes,
                       refit_batch_size=args.batch_size if args.refit else None,
                       refit_windows=args.refit_windows, polish=_polish_config(args))
    if args.json:
        return plan.to_dict()
    print(plan.table())
    return None


def cmd_compare(args) -> dict:
    from .compare import CompareConfig, run_compare
    options: dict = {}
    for item in args.opt or []:
        key, value = _parse_opt(item)
        method, _, field = key.rpartition(".")
        options.setdefault(method or "*", {})[field] = value
    cfg = CompareConfig(
        model=args.model, methods=args.methods or (), ratios=args.ratios,
        selections=args.selection, decompositions=args.decomposition, scope=args.ratio_scope,
        calib=args.calib, n_calib=args.n_calib, seq_len=args.seq_len, eval_text=args.eval_text,
        eval_seq_len=args.eval_seq_len, max_eval_windows=args.max_eval_windows,
        eval_sample=args.eval_sample,
        tasks=args.tasks or (), task_limit=args.limit, options=options,
        allow_compressed=args.allow_compressed, seeds=args.seeds,
        batch_size=args.batch_size, device=args.device, refit=args.refit,
        refit_windows=args.refit_windows, vote=args.vote, polish=args.polish)
    bar, cell = tqdm(desc="compare", unit="cell", leave=False), [""]

    def progress(e: dict) -> None:   # cells done, the running cell and its training step
        if e["type"] == "grid":
            bar.total, bar.n, cell[0] = e["total"], e["done"], e.get("cell", "")
            bar.set_postfix_str(cell[0])
        elif e["type"] == "step":
            bar.set_postfix_str(f"{cell[0]} step {e['step']}")
    try:
        df = run_compare(cfg, args.out, log=lambda msg: tqdm.write(msg, file=sys.stderr),
                         emit=progress)
    finally:
        bar.close()
    shown = [c for c in df.columns if c not in ("ranks", "error")]
    print(df[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"), file=sys.stderr)
    return {"cells": len(df), "errors": int(df["error"].notna().sum()),
            "out": str(Path(args.out) / "results.csv")}


COMMANDS = {"spectra": cmd_spectra, "compress": cmd_compress, "export": cmd_export,
            "eval": cmd_eval, "plan-memory": cmd_plan_memory, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except (LLRCError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0
