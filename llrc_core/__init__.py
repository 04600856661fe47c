"""LLRC Studio core: low-rank compression of language models with learned rank selection.

    from llrc_core import load_model, calibrate, decompose_model, select_plan, compress_

Importing the package is light (no transformers, no CUDA): each name below is imported from
its module on first use (PEP 562), so ``llrc --help`` and tools that only read plans start
fast.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "apply": ("LowRankLinear", "apply_plan_", "restore_"),
    "calibration": ("CalibConfig", "load_calibration"),
    "counting": ("break_even", "layer_cost"),
    "decompose": ("Factors", "decompose"),
    "errors": ("LLRCError", "Stopped"),
    "evaluate": ("eval_windows", "perplexity"),
    "export": ("export_model", "load_compressed"),
    "models": ("find_targets", "load_model"),
    "pipeline": ("calibrate", "compress_", "decompose_model", "select_plan", "spectra_rows"),
    "plan": ("LayerPlan", "RankPlan"),
    "selectors": ("SELECTORS", "get_selector"),
    "workflow": ("compress",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    try:                                   # submodules: llrc_core.compare, llrc_core.analysis
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return __all__
