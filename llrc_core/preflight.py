"""One validation pass before anything heavy: every input of a compression run that can be
checked without reading weights is checked here, in the order a user would fix it.

Method options and the (selection, decomposition) pair, the output folder, the evaluation and
calibration files, the model folder, the target ratio's reachability (from the layer shapes
of the model built on the meta device: any size, no memory), the calibration size (with
the tokenizer only) and the memory plan against the memory this machine has
(``check_fits``). A 7B run that would fail after tens of minutes fails here in seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import distributed
from .calibration import local_text, tokenize
from .errors import CalibrationError, LLRCError
from .files import prepare_destination
from .planner import GIB, MemoryPlan, plan_memory
from .shards import DEFAULT_MAX_SHARD


def check_compress(model: str, method: str, decomposition: str, options: dict, *,
                   calib: str | None, n_calib: int, seq_len: int, out: str | None = None,
                   force: bool = False, eval_text: str | None = None,
                   trust_remote_code: bool = False, device: str | None = None,
                   dtype: str | None = None, batch_size: int = 8,
                   allow_compressed: bool = False, offload: str = "auto",
                   factor_dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD,
                   shard_over: int = 1, gpus: int = 1, refit: bool = False,
                   refit_windows: int = 0, polish=None) -> tuple[list[dict], MemoryPlan]:
    """Raise the first problem (``ValueError``/``LLRCError``/``FileNotFoundError`` naming the
    fix); return the warnings a run should carry (e.g. overlapping calibration windows) and
    the memory plan it fits in (its ``placement`` is the one to run with). ``refit``: the
    run refits after apply, ``batch_size`` windows a batch (the planner's refit phase), on
    ``refit_windows`` windows of its own (0: the calibration's).
    ``polish``: the run polishes with this ``PolishConfig`` (its polish phase)."""
    from .models import (context_length, count_params, find_targets, pick_device, pick_dtype,
                         refuse_export, resolve_source, skeleton)
    from .pipeline import method_config
    from .selectors import SelectionContext, get_selector

    cfg = method_config(method, decomposition, **options)
    if out is not None:
        prepare_destination(Path(out), force)
    if eval_text and not Path(eval_text).expanduser().is_file():
        raise FileNotFoundError(f"--eval-text not found: {eval_text!r}")
    if calib is None and (decomposition != "svd" or get_selector(method).calibration):
        raise CalibrationError(f"{method} on the {decomposition} decomposition needs "
                               "calibration data: pass --calib FILE (or 'selfgen')")
    text = local_text(calib, seq_len) if calib and calib != "selfgen" else None
    src = resolve_source(model)
    refuse_export(src, allow_compressed)       # an LLRC export: said before anything else
    meta = skeleton(src, trust_remote_code)
    shapes = {t.name: (t.m, t.n) for t in find_targets(meta)}
    SelectionContext(shapes, {}, count_params(meta)).reachable_budget(cfg)
    compute = str(pick_dtype(dtype, pick_device(device))).removeprefix("torch.")
    memory = check_fits(src, method, decomposition, dtype=compute, n_calib=n_calib,
                        seq_len=seq_len, batch_size=getattr(cfg, "batch_size", batch_size),
                        device=device, meta=meta, offload=offload, factor_dtype=factor_dtype,
                        train_seq_len=getattr(cfg, "train_seq_len", 0),
                        max_shard_size=max_shard_size, shard_over=shard_over, gpus=gpus,
                        refit_batch_size=batch_size if refit else None,
                        refit_windows=refit_windows, polish=polish)
    warnings = []
    seq_len = min(seq_len, context_length(meta))         # as ``pipeline.calibrate`` clamps
    if text is not None:
        from transformers import AutoTokenizer
        tokens = tokenize(AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code),
                          text).numel()
        if tokens < seq_len + 1:
            raise CalibrationError(f"calibration text {calib!r} has {tokens} tokens, fewer than "
                                   f"one window of {seq_len}; give a longer text or a smaller "
                                   "--seq-len")
        if tokens < n_calib * seq_len:
            warnings.append({"kind": "calibration_overlap", "message": (
                f"the calibration text has {tokens} tokens, fewer than --n-calib x --seq-len = "
                f"{n_calib * seq_len}: the {n_calib} windows overlap; give a longer text for "
                "independent windows")})
    return warnings, memory


def refusal(plan: MemoryPlan) -> str:
    """The message ``compress`` stops with when a plan does not fit (a GPU or the host)."""
    need = plan.peak_bytes / GIB
    if plan.gpus:
        where = "on one GPU" if plan.gpus == 1 else f"on the fullest of its {plan.gpus} GPUs"
        cap = f"{plan.gpu_memory:g} GiB (5 % margin)"
        offload = "" if plan.placement is None or plan.placement.offload_weights else \
            "--offload weights, "
        fix = f"{offload}a GPU with more memory, a smaller --batch-size or --n-calib/--seq-len, " \
              f"its blocks across more GPUs of this machine (--gpus {plan.gpus + 1} or more), " \
              "factors sharded over more processes (torchrun --nproc_per_node N ... " \
              "--shard-factors), or a non-learned method"
    else:
        where, cap = "of memory", f"this machine's {plan.gpu_memory:.1f} GiB"
        fix = "a machine with more memory or a GPU, a smaller --batch-size or " \
              "--n-calib/--seq-len"
    return (f"{plan.model} with {plan.method} needs {need:.1f} GiB {where} in its "
            f"{plan.peak_phase} phase, more than {cap}: use {fix}; `llrc plan-memory` shows "
            "each phase")


def device_memory_gib(device: str | None, gpus: int = 1) -> tuple[int, float]:
    """``(gpus, GiB per device)`` the run will have: ``gpus`` CUDA devices and the smallest
    one's memory, or the host's physical memory for a CPU run (``gpus == 0``);
    ``LLRCError`` when more GPUs are asked for than this machine shows."""
    seen = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus > 1 and seen < gpus:
        raise LLRCError(f"--gpus {gpus} places the model's blocks across {gpus} GPUs, but "
                        f"this machine shows {seen}{' (--device cpu)' if device == 'cpu' else ''}"
                        f": use --gpus {max(seen, 1)}, or set CUDA_VISIBLE_DEVICES to show them")
    if seen:
        gpus = max(gpus, 1)
        return gpus, min(torch.cuda.get_device_properties(g).total_memory
                         for g in range(gpus)) / GIB
    return 0, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


def check_fits(model: str, method: str, decomposition: str, *, dtype: str, n_calib: int,
               seq_len: int, batch_size: int, device: str | None, meta, offload: str = "auto",
               factor_dtype: str | None = None, train_seq_len: int | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD, shard_over: int = 1,
               gpus: int = 1, refit_batch_size: int | None = None,
               polish=None, refit_windows: int = 0) -> MemoryPlan:
    """The plan of this run on the memory it will have, in each of its processes (its
    ``placement`` is the one the run uses; across ``gpus`` > 1 GPUs, ``spread.placed`` of
    its facts the module map); ``LLRCError`` when it cannot fit."""
    if gpus < 1:
        raise LLRCError(f"--gpus must be at least 1, got {gpus} (--device cpu for a CPU run)")
    if gpus > 1 and distributed.world_size() > 1:
        raise LLRCError(f"--gpus {gpus} places one process's blocks across GPUs; under "
                        "torchrun each process uses one GPU: drop --gpus (or launch one process)")
    gpus, gib = device_memory_gib(device, gpus)
    plan = plan_memory(model, dtype, method, decomposition, n_calib, seq_len, batch_size,
                       gpus=gpus, gpu_memory=gib, meta=meta, offload=offload,
                       factor_dtype=factor_dtype, train_seq_len=train_seq_len,
                       max_shard_size=max_shard_size, shard_over=shard_over,
                       processes=distributed.world_size(), refit_batch_size=refit_batch_size,
                       polish=polish, refit_windows=refit_windows)
    if not plan.fits:
        raise LLRCError(refusal(plan))
    return plan
