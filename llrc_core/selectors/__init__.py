"""Rank selectors. Each module registers one method; importing this package loads them all."""
from .base import SelectConfig, SelectionContext  # noqa: F401
from .registry import (SELECTORS, Method, any_k_methods, get_selector,  # noqa: F401
                       register_selector)
from . import uniform, energy, llrc  # noqa: F401,E402
from . import strs, drank, svdllm, svdllm2  # noqa: F401,E402
from . import ars, ara  # noqa: F401,E402
