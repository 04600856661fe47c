"""LLRC Studio core: low-rank compression of language models with learned rank selection.

    from llrc_core import load_model, calibrate, decompose_model, select_plan, compress_
"""
from .apply import LowRankLinear, apply_plan_, restore_
from .calibration import CalibConfig, load_calibration
from .counting import break_even, layer_cost
from .decompose import Factors, decompose
from .errors import LLRCError
from .evaluate import eval_windows, perplexity
from .export import export_model, load_compressed
from .models import find_targets, load_model
from .pipeline import calibrate, compress_, decompose_model, select_plan, spectra_rows
from .plan import LayerPlan, RankPlan
from .selectors import SELECTORS, get_selector

__all__ = ["LowRankLinear", "apply_plan_", "restore_", "CalibConfig", "load_calibration",
           "break_even", "layer_cost", "Factors", "decompose", "LLRCError", "eval_windows",
           "export_model", "load_compressed",
           "perplexity", "find_targets", "load_model", "calibrate", "compress_",
           "decompose_model", "select_plan", "spectra_rows", "LayerPlan", "RankPlan",
           "SELECTORS", "get_selector"]
__version__ = "0.1.0"
