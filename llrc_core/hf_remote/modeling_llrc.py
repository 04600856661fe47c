"""LLRC low-rank export: load with stock transformers and ``trust_remote_code=True``.

This file is copied into every LLRC export folder and is named by the ``auto_map`` of its
``config.json``. It is self-contained (torch, transformers, safetensors only) so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

reads the export's own config type (``model_type: "llrc"``, ``LLRCExportConfig``;
without ``trust_remote_code`` transformers refuses the folder instead of building the plain
base class with random low-rank layers), rebuilds the base config (``llrc.base_model_type`` and
the fields around it) and the original architecture (``llrc.base_class``),
swaps every factorised layer for a ``LowRankLinear`` (``y = A (B x) + bias``) and lets
transformers load ``model.safetensors`` (or its shards, named by
``model.safetensors.index.json``) as usual. A layer marked ``"stored": "dense"`` (format
3: its factors were multiplied back at export because they ran slower than the dense matrix)
keeps the base class's own module and loads ``W = A B`` as its weight. Before any weight is
read the folder is checked: every file the export wrote is present with its size, each planned
layer exists with the planned shape, each tensor in the weights file has the shape its layer's
rank implies, and the kept singular-value indices in ``config.json`` are the ones the weights
were written for.
Any mismatch raises ``LLRCExportError`` naming the layer and the problem.

The ``llrc_core`` package reuses the checks here for its own loader (without remote code).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

FORMAT = 2                      # version of the ``llrc`` section in config.json
FORMAT_STORED_DENSE = 3         # written when some low-rank layer is stored dense (``stored``)
READS = (1, 2, 3)               # formats this loader reads (1: base model_type at the top)
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"   # a sharded export: transformers' index of the shards
MODEL_TYPE = "llrc"             # the export's own model_type: no stock class claims it


class LLRCExportError(ValueError):
    """The export folder is incomplete or does not match its config."""


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias`` with ``B (k x n)`` then ``A (m x k)``; same state-dict layout
    (``A.weight``, ``A.bias``, ``B.weight``) and forward as ``llrc_core.apply.LowRankLinear``:
    one ``F.linear`` chain on the parameters (no submodule calls; the bias is added inside the
    second GEMM)."""

    def __init__(self, in_features, out_features, rank, bias=True, kept=None, dtype=None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.kept = list(range(rank)) if kept is None else list(kept)
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        h = F.linear(x, self.B.weight)                       # (..., n) -> (..., k)
        return F.linear(h, self.A.weight, self.A.bias)       # (..., k) -> (..., m)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


# --- checks shared with llrc_core.export -------------------------------------------------------

def llrc_section(config) -> dict:
    """The ``llrc`` section of a config (object or dict), validated for format."""
    sec = config.get("llrc") if isinstance(config, dict) else getattr(config, "llrc", None)
    if not isinstance(sec, dict) or "plan" not in sec:
        raise LLRCExportError("config.json has no 'llrc' section with a 'plan': this folder is "
                              "not an LLRC low-rank export")
    if sec.get("format") not in READS:
        raise LLRCExportError(f"config.json llrc format {sec.get('format')!r} is not supported "
                              f"(this loader reads formats {READS}); re-export with this version")
    return sec


# fields of the export's own config that are not the base model's
_OWN_FIELDS = ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path")


def base_config(config, raw: dict | None = None):
    """The base model's config (e.g. ``BertConfig``) from an export config
    (``LLRCExportConfig`` object or dict): ``llrc.base_model_type`` with every other field;
    keys missing from the object (transformers drops a few, e.g. ``use_cache``) are taken
    from ``raw``, the file. The ``llrc`` section stays on it (``_low_rank_class`` reads the
    plan there)."""
    from transformers import AutoConfig, __version__

    fields = {**(raw or {}), **(config if isinstance(config, dict) else config.to_dict())}
    sec = llrc_section(fields)
    base_type = sec.get("base_model_type") or fields.get("model_type")   # format 1: at the top
    if base_type in (None, MODEL_TYPE):
        raise LLRCExportError("config.json names no base model type (llrc.base_model_type); "
                              "the config was edited: export again")
    try:
        cfg = AutoConfig.for_model(base_type, **{k: v for k, v in fields.items()
                                                 if k not in _OWN_FIELDS})
    except ValueError:
        raise LLRCExportError(f"base model type {base_type!r} is not in transformers "
                              f"{__version__}; upgrade transformers") from None
    cfg.architectures = [sec.get("base_class")]
    return cfg


class LLRCExportConfig(PretrainedConfig):
    """The export's config: the base model's fields, ``model_type "llrc"`` and the ``llrc``
    section (plan, base class, base model type). ``base_config`` turns it back into the
    base model's config."""

    model_type = MODEL_TYPE


def layer_specs(sec: dict) -> dict:
    """``{name: (m, n, kept or None)}`` from the llrc section, each entry checked; a layer
    stored dense (``"stored": "dense"``) has ``kept`` None here (its module stays the base
    class's own); ``stored_dense(sec)`` names those layers."""
    specs = {}
    merged = stored_dense(sec)
    for name, lp in sec["plan"].get("layers", {}).items():
        try:
            m, n = (int(v) for v in lp["shape"])
            kept = lp.get("kept")
        except (KeyError, TypeError, ValueError) as exc:
            raise LLRCExportError(f"layer {name!r}: malformed entry in config.json ({exc})")
        if kept is not None:
            kept = [int(i) for i in kept]
            full, even = min(m, n), math.ceil(m * n / (m + n))
            if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= full:
                raise LLRCExportError(f"layer {name!r}: kept indices must be a sorted, non-empty "
                                      f"list of distinct values in [0, {full}); config.json was "
                                      "edited or is corrupt")
            if "rank" in lp and int(lp["rank"]) != len(kept):
                raise LLRCExportError(f"layer {name!r}: config.json says rank {lp['rank']} but "
                                      f"lists {len(kept)} kept indices; the config was edited")
            if len(kept) >= even:
                raise LLRCExportError(f"layer {name!r}: rank {len(kept)} is at or above the "
                                      f"break-even rank {even}; such a layer is stored dense, so "
                                      "config.json was edited")
        specs[name] = (m, n, None if name in merged else kept)
    return specs


def stored_dense(sec: dict) -> set[str]:
    """Low-rank layers of the plan stored as one dense ``W = A B`` (format 3)."""
    layers = sec["plan"].get("layers", {})
    names = {n for n, lp in layers.items()
             if isinstance(lp, dict) and lp.get("stored") == "dense"}
    bad = sorted(n for n in names if layers[n].get("kept") is None)
    if bad:
        raise LLRCExportError(f"layer {bad[0]!r} is marked stored dense but keeps no singular "
                              "values; config.json was edited")
    return names


def check_files(folder: str, sec: dict) -> None:
    """Every file the export wrote exists with the size it had when written."""
    for fname, size in sec.get("files", {}).items():
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise LLRCExportError(f"{fname} is missing from {folder!r}: the export is incomplete; "
                                  "copy the whole folder or export again")
        if os.path.getsize(path) != size:
            raise LLRCExportError(f"{fname} in {folder!r} has {os.path.getsize(path)} bytes but "
                                  f"the export wrote {size}: truncated or replaced; export again")


def _module_shape(mod) -> tuple[int, int] | None:
    """``(m, n)`` of a linear layer (``Conv1D`` stores its weight transposed) else None."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if type(mod).__name__ == "Conv1D":
        n, m = mod.weight.shape
        return m, n
    return None


def swap_low_rank_(model: nn.Module, specs: dict, make_layer=LowRankLinear) -> nn.Module:
    """Replace every factorised layer of ``specs`` by ``make_layer(n, m, k, bias, kept, ...)``
    in the dtype and device of the layer it replaces; dense layers are only checked."""
    arch = type(model).__name__
    for name, (m, n, kept) in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LLRCExportError(f"layer {name!r} named in config.json does not exist in {arch}; "
                                  "the config was edited or belongs to another model") from None
        shape = _module_shape(old)
        if shape is None:
            raise LLRCExportError(f"layer {name!r} is a {type(old).__name__} in {arch}, not a "
                                  "linear layer; the config belongs to another model")
        if shape != (m, n):
            raise LLRCExportError(f"layer {name!r}: config.json gives shape {(m, n)} but {arch} "
                                  f"has {shape}; the config was edited or belongs to another model")
        if kept is None:
            continue
        w = old.weight
        new = make_layer(n, m, len(kept), getattr(old, "bias", None) is not None, kept,
                         dtype=w.dtype, device=w.device)
        model.set_submodule(name, new)
    return model


def has_weights(folder: str) -> bool:
    """The folder holds ``model.safetensors`` or the index of its shards."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in (WEIGHTS, INDEX))


def weight_files(folder: str) -> tuple[list[str], dict | None]:
    """The weights files of an export (``model.safetensors``, or the shards its index names)
    and the index's metadata (None for one file)."""
    index = os.path.join(folder, INDEX)
    if not os.path.isfile(index):
        return [os.path.join(folder, WEIGHTS)], None
    with open(index, encoding="utf-8") as f:
        raw = json.load(f)
    names = sorted(set(raw.get("weight_map", {}).values()))
    bad = [n for n in names if os.path.basename(n) != n]
    if bad or not names:
        raise LLRCExportError(f"{INDEX} in {folder!r} names no shard or a path outside the "
                              f"folder ({bad[:1]}); export again")
    return [os.path.join(folder, n) for n in names], raw.get("metadata") or {}


def read_headers(folder: str) -> tuple[dict, dict]:
    """``({key: shape}, metadata)`` over every weights file, reading headers only; the LLRC
    metadata of a sharded export is the index's."""
    from safetensors import safe_open

    files, meta = weight_files(folder)
    shapes = {}
    for path in files:
        if not os.path.isfile(path):
            raise LLRCExportError(f"{os.path.basename(path)} is missing from {folder!r}: the "
                                  "export is incomplete; copy the whole folder or export again")
        with safe_open(path, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            if meta is None:                    # one file: its own header's metadata
                meta = f.metadata() or {}
    return shapes, meta


def check_weights(folder: str, specs: dict, model: nn.Module, sec: dict | None = None) -> None:
    """Shapes in the safetensors headers agree with ``specs``; the kept indices the weights
    were written for (metadata) agree with config.json (``sec``, for the layers stored dense).
    Reads the headers only."""
    shapes, meta = read_headers(folder)
    keys = set(shapes)
    written = json.loads(meta.get("llrc_layers", "null"))
    if written is None:
        raise LLRCExportError(f"the weights in {folder!r} carry no LLRC metadata: they were not "
                              "written by the LLRC exporter (or were replaced); export again")
    layers = (sec or {}).get("plan", {}).get("layers", {})
    planned = {n: lp.get("kept") for n, lp in layers.items()}   # stored-dense layers too
    for name, (m, n, kept) in specs.items():
        if kept is None:
            old = model.get_submodule(name)
            want = {f"{name}.weight": tuple(old.weight.shape)}
        else:
            k = len(kept)
            want = {f"{name}.A.weight": (m, k), f"{name}.B.weight": (k, n)}
            if getattr(model.get_submodule(name).A, "bias", None) is not None:
                want[f"{name}.A.bias"] = (m,)
        for key, shape in want.items():
            if key not in keys:
                raise LLRCExportError(f"layer {name!r}: {key} is missing from the weights file; "
                                      "the config does not match the weights (export again)")
            if shapes[key] != shape:
                raise LLRCExportError(f"layer {name!r}: config.json implies {key} of shape {shape} "
                                      f"but the weights file holds {shapes[key]}; the rank in the "
                                      "config was changed or the files come from different exports")
        if name not in written or written[name] != planned.get(name, kept):
            raise LLRCExportError(f"layer {name!r}: the kept indices in config.json differ from "
                                  "the ones the weights were written for; the config was edited")
    extra = sorted(set(written) - set(specs))
    if extra:
        raise LLRCExportError(f"layer {extra[0]!r} is in the weights but not in config.json; "
                              "the config was edited")


def check_folder(folder: str, sec: dict) -> dict:
    """Files present and specs valid; returns the specs."""
    check_files(folder, sec)
    if not has_weights(folder):
        raise LLRCExportError(f"{WEIGHTS} is missing from {folder!r}: export again")
    return layer_specs(sec)


# --- the class auto_map points to ---------------------------------------------------------------

_CLASSES: dict = {}


def _low_rank_class(config):
    """A subclass of the base architecture that swaps in the planned low-rank layers."""
    import transformers

    sec = llrc_section(config)
    base_name = sec.get("base_class")
    base = getattr(transformers, str(base_name), None)
    if base is None:
        raise LLRCExportError(f"base architecture {base_name!r} is not in transformers "
                              f"{transformers.__version__}; upgrade transformers")
    if base_name not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            swap_low_rank_(self, layer_specs(llrc_section(config)))

        _CLASSES[base_name] = type(f"LLRC{base_name}", (base,), {
            "__init__": __init__, "__module__": __name__,
            "__doc__": f"{base_name} with LLRC low-rank layers."})
    return _CLASSES[base_name]


class LLRCModel:
    """Entry point for ``auto_map``: builds ``LLRC<BaseClass>`` for the base config of the
    ``LLRCExportConfig`` it is given and delegates to its (stock) ``from_pretrained`` /
    ``_from_config``."""

    config_class = LLRCExportConfig
    _auto_class = None

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__

    @classmethod
    def _from_config(cls, config, **kwargs):
        if getattr(config, "model_type", None) == MODEL_TYPE:
            config = base_config(config)
        return _low_rank_class(config)._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, folder, *args, config=None, **kwargs):
        folder = str(folder)
        if not os.path.isdir(folder):
            raise LLRCExportError(f"{folder!r} is not a folder; LLRC exports load from a local "
                                  "folder (download the repository first)")
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        config = base_config(raw if config is None else config, raw)
        sec = llrc_section(config)
        specs = check_folder(folder, sec)
        klass = _low_rank_class(config)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = getattr(torch, sec.get("dtype", "float32"))
        want_info = kwargs.pop("output_loading_info", False)
        # check the header before transformers reads a tensor, on a skeleton without weights
        with torch.device("meta"):
            skeleton = klass._from_config(config, dtype=kwargs["dtype"])
        check_weights(folder, specs, skeleton, sec)
        model, info = klass.from_pretrained(folder, *args, config=config,
                                            output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                       "mismatched_keys") and v}
        if bad:
            raise LLRCExportError(f"weights do not match the model: {bad}")
        model._auto_class = cls._auto_class
        return (model, info) if want_info else model
