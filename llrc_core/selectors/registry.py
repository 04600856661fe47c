"""The method registry: each selector registers once, with what it supports.

Entry points (CLI, comparison grid, app pages) read every list of names from here: the
methods, their selections and decompositions, the one each prefers, whether it trains.
A (selection, decomposition) pair a method does not support is refused with a message
that names the fix, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..decompose import DECOMPOSITIONS
from .base import SELECTIONS, SelectConfig


@dataclass(frozen=True)
class Method:
    """A registered rank selector: ``select(ctx, cfg) -> RankPlan`` and its metadata."""
    name: str
    select: Callable
    config: type = SelectConfig                 # dataclass of the method's options
    selections: tuple[str, ...] = ("top-k",)    # "any-k" only where the method learns subsets
    decompositions: tuple[str, ...] = ()        # empty: every registered decomposition
    preferred: str = "asvd"                     # its default: the best measured, or its paper's
    trains: bool = False                        # runs a mask-training loop (live charts)
    calibration: bool = False                   # runs the model on calibration windows

    @property
    def allowed_decompositions(self) -> tuple[str, ...]:
        return self.decompositions or tuple(DECOMPOSITIONS)

    def resolve(self, decomposition: str) -> str:
        """``auto``: the method's preferred decomposition; any other name as it is."""
        return self.preferred if decomposition == "auto" else decomposition

    def check(self, selection: str, decomposition: str) -> None:
        """``ValueError`` naming the fix for a pair this method does not support."""
        for axis, value, allowed, fix in (
                ("selection", selection, self.selections,
                 f"--selection {self.selections[0]}, or a method that learns any-k masks "
                 f"({', '.join(any_k_methods()) or 'none registered'})"),
                ("decomposition", decomposition, self.allowed_decompositions,
                 f"--decomposition {self.preferred}, or method 'uniform' for uniform ranks on "
                 f"{decomposition!r}")):
            if value not in allowed:
                raise ValueError(f"method {self.name!r} supports {axis} {' or '.join(allowed)}, "
                                 f"not {value!r}: use {fix}")


SELECTORS: dict[str, Method] = {}


def register_selector(name: str, config: type = SelectConfig, *,
                      selections: tuple[str, ...] = ("top-k",),
                      decompositions: tuple[str, ...] = (), preferred: str = "asvd",
                      trains: bool = False, calibration: bool = False):
    """Decorator registering ``fn(ctx, cfg) -> RankPlan`` under ``name`` (once)."""
    bad = set(selections) - set(SELECTIONS)
    if bad or not selections:
        raise ValueError(f"selections must be a non-empty subset of {SELECTIONS}, got "
                         f"{selections!r}")

    def deco(fn):
        if name in SELECTORS:
            raise ValueError(f"a method named {name!r} is already registered "
                             f"({SELECTORS[name].select.__module__}); pick another name")
        SELECTORS[name] = Method(name, fn, config, tuple(selections), tuple(decompositions),
                                 preferred, trains, calibration or trains)
        return fn
    return deco


def get_selector(name: str) -> Method:
    if name not in SELECTORS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SELECTORS)}")
    return SELECTORS[name]


def any_k_methods() -> list[str]:
    return sorted(n for n, m in SELECTORS.items() if "any-k" in m.selections)
