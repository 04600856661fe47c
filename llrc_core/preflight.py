"""One validation pass before anything heavy: every input of a compression run that can be
checked without reading weights is checked here, in the order a user would fix it.

Method options and the (selection, decomposition) pair, the output folder, the evaluation and
calibration files, the model folder, the target ratio's reachability (from the layer shapes
of the model built on the meta device: any size, no memory) and the calibration size (with
the tokenizer only). A 7B run that would fail after tens of minutes fails here in seconds.
"""
from __future__ import annotations

from pathlib import Path

from .calibration import local_text, tokenize
from .errors import CalibrationError
from .files import prepare_destination
from .planner import MemoryPlan
from .shards import DEFAULT_MAX_SHARD


def check_compress(model: str, method: str, decomposition: str, options: dict, *,
                   calib: str | None, n_calib: int, seq_len: int, out: str | None = None,
                   force: bool = False, eval_text: str | None = None,
                   trust_remote_code: bool = False, device: str | None = None,
                   dtype: str | None = None, batch_size: int = 8,
                   allow_compressed: bool = False, offload: str = "auto",
                   factor_dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD,
                   shard_over: int = 1, gpus: int = 1) -> tuple[list[dict], MemoryPlan]:
    """Raise the first problem (``ValueError``/``LLRCError``/``FileNotFoundError`` naming the
    fix); return the warnings a run should carry (e.g. overlapping calibration windows) and
    the memory plan it fits in (its ``placement`` is the one to run with)."""
    from .models import (context_length, count_params, find_targets, pick_device, pick_dtype,
                         refuse_export, resolve_source, skeleton)
    from .pipeline import method_config
    from .planner import check_fits
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
                        max_shard_size=max_shard_size, shard_over=shard_over, gpus=gpus)
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

