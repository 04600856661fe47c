"""The rank plan: plain data saying which singular values each target layer keeps.

Keyed by the full module name. A layer keeps a list of singular-value indices (a prefix for
top-k, any subset for any-k) or is dense (``kept is None``). The break-even rule is applied on
creation: a layer whose kept count reaches break-even becomes dense. Plans are independent of
how they were found and round-trip through JSON.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .counting import break_even, layer_cost, ratios
from .files import atomic_text

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    m: int                          # out features
    n: int                          # in features
    kept: list[int] | None = None   # kept singular-value indices; None = dense (original weight)

    def __post_init__(self):
        if self.kept is not None:
            kept = sorted({int(i) for i in self.kept})
            full = min(self.m, self.n)
            if kept and (kept[0] < 0 or kept[-1] >= full):
                raise ValueError(f"kept indices must lie in [0, {full}), got {kept[0]}..{kept[-1]}")
            if not kept:
                raise ValueError("a layer must keep at least one singular value")
            self.kept = None if len(kept) >= break_even(self.m, self.n) else kept

    @property
    def dense(self) -> bool:
        return self.kept is None

    @property
    def rank(self) -> int:
        """Kept singular values; a dense layer counts its full rank."""
        return min(self.m, self.n) if self.kept is None else len(self.kept)

    @property
    def params(self) -> int:
        return self.m * self.n if self.kept is None else layer_cost(self.m, self.n, len(self.kept))

    @property
    def is_prefix(self) -> bool:
        return self.kept is None or self.kept == list(range(len(self.kept)))


@dataclass
class RankPlan:
    layers: dict[str, LayerPlan]
    total_params: int                      # whole model before compression
    method: str = "manual"
    decomposition: str = "svd"
    selection: str = "top-k"
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_ranks(cls, shapes: dict[str, tuple[int, int]], ranks: dict[str, int],
                   total_params: int, **kw) -> "RankPlan":
        """Top-k plan: each layer keeps the prefix ``0..k-1``."""
        layers = {name: LayerPlan(m, n, list(range(max(1, int(ranks[name])))))
                  for name, (m, n) in shapes.items()}
        return cls(layers, total_params, **kw)

    # --- accounting ---------------------------------------------------------------------------
    @property
    def dense_linear(self) -> int:
        return sum(lp.m * lp.n for lp in self.layers.values())

    @property
    def kept_linear(self) -> int:
        return sum(lp.params for lp in self.layers.values())

    def ratio(self, scope: str = "linear") -> float:
        return ratios(self.kept_linear, self.dense_linear, self.total_params)[scope]

    def ranks(self) -> dict[str, int]:
        return {name: lp.rank for name, lp in self.layers.items()}

    def summary(self) -> dict:
        return {"method": self.method, "decomposition": self.decomposition,
                "selection": self.selection,
                "achieved_ratio_linear": self.ratio("linear"),
                "achieved_ratio_model": self.ratio("model"),
                "dense_layers": sum(lp.dense for lp in self.layers.values()),
                "ranks": self.ranks()}

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "method": self.method,
                "decomposition": self.decomposition, "selection": self.selection,
                "total_params": self.total_params, "meta": self.meta,
                "layers": {name: {"shape": [lp.m, lp.n], "kept": lp.kept}
                           for name, lp in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RankPlan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported rank-plan version {d.get('version')!r} "
                             f"(this library reads version {PLAN_VERSION})")
        try:
            layers = {name: LayerPlan(int(v["shape"][0]), int(v["shape"][1]), v["kept"])
                      for name, v in d["layers"].items()}
            return cls(layers, int(d["total_params"]), d.get("method", "manual"),
                       d.get("decomposition", "svd"), d.get("selection", "top-k"),
                       d.get("meta", {}))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed rank plan: missing or bad field {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        atomic_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "RankPlan":
        return cls.from_json(Path(path).read_text())

    def to_csv(self) -> str:
        """One row per layer: name, shape, kept rank, dense flag, parameters, kept indices."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", "m", "n", "rank", "dense", "params", "kept"])
        for name, lp in self.layers.items():
            kept = "" if lp.kept is None else " ".join(map(str, lp.kept))
            w.writerow([name, lp.m, lp.n, lp.rank, int(lp.dense), lp.params, kept])
        return buf.getvalue()
