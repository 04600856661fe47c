"""Write a compressed model to a folder that reloads, and load it back.

The folder holds ``model.safetensors`` (factor weights; dense weights for dense layers),
``config.json`` (the base config plus an ``llrc`` section with the rank plan), the tokenizer,
``rank_plan.json`` / ``rank_plan.csv`` and ``report.json``. Writing goes to a temporary
folder renamed into place at the end, so a failure leaves nothing at the destination.
Weights are safetensors only (never pickle).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .apply import LowRankLinear, swap_module_
from .errors import ModelLoadError
from .plan import RankPlan

WEIGHTS = "model.safetensors"


def _prepare_destination(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"destination {str(out)!r} exists and is not empty; choose another "
                              "folder or pass --force to replace it")


def export_model(model, tokenizer, plan: RankPlan, out: str | Path, *, report: dict | None = None,
                 force: bool = False) -> Path:
    """Save the compressed ``model`` (with ``plan`` applied) atomically into ``out``."""
    out = Path(out).expanduser()
    _prepare_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "llrc": "1"})
        cfg = model.config.to_dict()
        cfg["llrc"] = {"plan": plan.to_dict()}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "rank_plan.json")
        (tmp / "rank_plan.csv").write_text(plan.to_csv())
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_compressed(path: str | Path, device: str | None = None):
    """Rebuild the architecture from ``config.json``, insert the low-rank layers the plan
    names, and load the safetensors weights (strict). Returns ``(model, tokenizer, plan)``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    for f in ("config.json", WEIGHTS):
        if not (path / f).exists():
            raise ModelLoadError(f"{str(path / f)!r} is missing: not an LLRC export folder")
    raw = json.loads((path / "config.json").read_text())
    if "llrc" not in raw:
        raise ModelLoadError(f"{str(path)!r}: config.json has no 'llrc' section")
    plan = RankPlan.from_dict(raw["llrc"]["plan"])
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if getattr(config, "is_decoder", True) else AutoModel
    model = auto.from_config(config)
    for name, lp in plan.layers.items():
        if lp.dense:
            continue
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None) is not None
        swap_module_(model, name, LowRankLinear(lp.n, lp.m, lp.rank, bias, lp.kept))
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if unexpected or [k for k in missing if not _is_tied(model, k)]:
        raise ModelLoadError(f"weights do not match the plan: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    model.to(device or "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() \
        else None
    return model, tokenizer, plan


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
