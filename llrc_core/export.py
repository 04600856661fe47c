"""Write a compressed model to a folder that reloads anywhere, and load it back.

A factorised export folder holds:
  model.safetensors   (or shards of at most ``max_shard_size`` and their index, ``shards.py``)
                      factor weights ``{layer}.A.weight (m, k)``, ``{layer}.B.weight (k, n)``,
                      ``{layer}.A.bias``; original weights for dense layers and everything else
                      (tied weights once); ``W = A B`` for a layer stored dense (below);
                      metadata: the kept indices each layer was written for
  config.json         the export's own ``model_type: "llrc"`` (so stock transformers refuses it
                      without ``trust_remote_code`` instead of building the base class with
                      random layers), the base config's fields, ``auto_map`` (AutoConfig and
                      AutoModelForCausalLM) to ``modeling_llrc.py``, and an ``llrc`` section:
                      base class and model type, dtype, the rank plan (shape, kept indices, rank
                      per layer), method and settings, both ratios, storage (compute and stored
                      dtype, weights size next to the source's), the files written with sizes
  modeling_llrc.py    self-contained loader for ``trust_remote_code=True`` (llrc_core/hf_remote)
  tokenizer files, generation_config.json, rank_plan.json, rank_plan.csv, report.json, README.md

``merged_dense=True`` writes instead a plain model of the original architecture (``A B``
multiplied back), loadable by any tool without remote code; it saves no memory.

``dense`` (``speed.StoredDense``) stores the layers it names as one ``W = A B`` each (same
outputs, saving given up): the plan in config.json marks them ``"stored": "dense"`` (format 3),
``llrc.stored_dense`` keeps the rule and timings, ``storage`` the recomputed stored ratios
(``stored_ratio_linear``, ``stored_ratio_model``: every export has them); the card says so.

Dtype: the weights are written in ``dtype`` (None: the model's own); callers pass the source
model's dtype so that an fp16 model is not stored as float32. Casting happens on the tensors
written (``A B`` of a merged layer is formed in float64 first), never on the caller's model.

Safety: everything is written into a hidden temporary folder beside the destination and
renamed into place at the end, so a failure or an interrupt leaves nothing at the destination.
A non-empty destination is refused unless ``force``. Weights are safetensors only: nothing is
ever unpickled. Loading checks the folder first and names the layer and the problem.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .apply import LowRankLinear
from .errors import ModelLoadError
from .files import atomic_folder, prepare_destination
from .hf_remote import MODELING_FILE
from .hf_remote import modeling_llrc as remote
from .card import model_card
from .models import DTYPES, source_estimate
from .plan import RankPlan
from .shards import DEFAULT_MAX_SHARD, WeightsRecipe, shard_bytes, write_shards
from .speed import StoredDense

WEIGHTS = remote.WEIGHTS
AUTO_CLASS = "AutoModelForCausalLM"
CONFIG_CLASS = "LLRCExportConfig"


# --- recognising an export -----------------------------------------------------------------------

def _read_config(path) -> dict | None:
    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None


def export_kind(path) -> str | None:
    """``"low-rank"`` for an LLRC factorised export, ``"merged"`` for a merged-dense one,
    None for anything else (a base model folder, a Hub id), from the manifest in config.json
    (its ``llrc`` / ``llrc_merged`` section); reads no weights."""
    raw = _read_config(path)
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("llrc"), dict):
        return "low-rank"
    return "merged" if isinstance(raw.get("llrc_merged"), dict) else None


def export_info(path) -> dict:
    """The manifest of an export (its ``llrc`` or ``llrc_merged`` section), {} otherwise."""
    raw = _read_config(path) or {}
    return raw.get("llrc") or raw.get("llrc_merged") or {}


def describe_export(path) -> str:
    """``"llrc, rho_linear 0.80"``: the method and ratio of an export, for messages."""
    info = export_info(path)
    ratio = info.get("ratio_linear")
    return f"{info.get('method', '?')}, rho_linear " + (f"{ratio:.2f}" if ratio else "?")


def recorded_source(path) -> dict | None:
    """The source model an export was made from (``model``, ``dtype``, ``weights_bytes``), as
    its manifest records it; None for an export written before this was recorded."""
    return (export_info(path).get("storage") or {}).get("source")


def stored_dense_of(path) -> StoredDense | None:
    """The low-rank layers an export stores dense (and why), None when it stores none."""
    sec = export_info(path).get("stored_dense")
    return StoredDense.from_dict(sec) if sec else None


def base_config_of(path):
    """The base model's config of a low-rank export (e.g. ``BertConfig``), built from the raw
    config.json (no AutoConfig on its ``llrc`` model type), without the plan."""
    config = remote.base_config(_read_config(path) or {})
    del config.llrc
    return config


# --- what to save --------------------------------------------------------------------------------

def base_class_name(model) -> str:
    """The transformers class the model is built on (a remote-code LLRC subclass included)."""
    import transformers
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and hasattr(transformers, cls.__name__):
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is not built on a transformers class; only "
                     "transformers architectures can be exported")


def _tied_targets(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys",
                                                                     None) or {}
    return set(tied)


def weights_to_save(model) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor once, under its source name (the one
    transformers loads and ties from), where the model holds it: ``shards.cast`` brings each
    to the CPU as its shard is written."""
    targets = _tied_targets(model)
    groups: dict[tuple, list[str]] = {}
    state = model.state_dict()
    for key, t in state.items():
        groups.setdefault((t.device, t.data_ptr(), t.dtype, tuple(t.shape)), []).append(key)
    out = {}
    for keys in groups.values():
        keep = next((k for k in keys if k not in targets), keys[0])
        out[keep] = state[keep].detach()
    return dict(sorted(out.items()))


def merged_weights(tensors: dict[str, torch.Tensor], plan: RankPlan, model,
                   dtype: torch.dtype | None = None, names=None) -> dict:
    """Factor weights multiplied back: ``W = A B`` (in float64, then ``dtype``, by default the
    factors' own) under the original key, transposed for GPT-2 style ``Conv1D`` layers, for the
    layers ``names`` (default: all low-rank); a layer already held dense is left as it is."""
    return _recipe(tensors, plan, model, dtype, names).make_all()


def _recipe(tensors, plan: RankPlan, model, dtype, names) -> WeightsRecipe:
    names = [n for n, lp in plan.layers.items() if not lp.dense] if names is None else names
    return WeightsRecipe.of(tensors, names, lambda n: _is_conv1d(model, n), dtype)


def _is_conv1d(model, name: str) -> bool:
    from .apply import originals_of
    original = originals_of(model).get(name)
    if original is not None:
        return type(original).__name__ == "Conv1D"
    import transformers
    with torch.device("meta"):   # no memory: only the module types matter
        skeleton = getattr(transformers, base_class_name(model))._from_config(model.config)
    return type(skeleton.get_submodule(name)).__name__ == "Conv1D"


def dtype_name(dtype) -> str:
    """``"float16"`` for ``torch.float16``, ``"fp16"``, ``"float16"``."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return str(dtype).removeprefix("torch.")


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the model mixes dtypes {sorted(map(str, dtypes))}; cast it to one "
                         "(model.to(torch.float16), ...) or pass dtype= to export_model")
    return dtype_name(dtypes.pop())


def source_of(model, plan: RankPlan, source: dict | None) -> dict:
    """What the export is compared with: the caller's ``source`` (``model``, ``dtype``,
    ``weights_bytes``, ``weights_from``), else the uncompressed model as it was in memory
    (the plan's parameter count in the model's dtype)."""
    if source and source.get("dtype") and source.get("weights_bytes"):
        return dict(source)
    dt = dtype_name((source or {}).get("dtype") or next(model.parameters()).dtype)
    return source_estimate((source or {}).get("model"), plan.total_params, getattr(torch, dt))


def _config_dict(model, plan: RankPlan, storage: dict, merged: bool,
                 report: dict | None, dense: StoredDense | None = None) -> dict:
    """config.json. Factorised: the export's own ``model_type`` (``llrc``) with the base
    config's fields, ``auto_map`` for AutoConfig and AutoModelForCausalLM, and the ``llrc``
    section (base model type kept there; layers stored dense marked, format 3). Merged dense:
    the plain base config plus ``llrc_merged``."""
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    base, dtype = base_class_name(model), storage["dtype"]
    for key in ("auto_map", "llrc", "llrc_merged", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(architectures=[base], dtype=dtype)
    info = {"format": remote.FORMAT, "base_class": base, "base_model_type": cfg["model_type"],
            "dtype": dtype, "method": plan.method, "decomposition": plan.decomposition,
            "selection": plan.selection, "settings": plan.meta,
            "ratio_linear": plan.ratio("linear"), "ratio_model": plan.ratio("model"),
            "storage": storage,
            "ppl": {k: report[k] for k in ("ppl_before", "ppl_after", "eval_text")
                    if k in (report or {})}}
    if merged:
        cfg["llrc_merged"] = info | {"ranks": plan.ranks()}
        return cfg
    layers = plan.to_dict()
    for name, entry in layers["layers"].items():
        entry["rank"] = plan.layers[name].rank
        if dense and name in dense.layers:
            entry["stored"] = "dense"
    if dense and dense.layers:
        info.update(format=remote.FORMAT_STORED_DENSE, stored_dense=dense.to_dict())
    cfg.update(model_type=remote.MODEL_TYPE, architectures=["LLRCModel"],
               auto_map={"AutoConfig": f"modeling_llrc.{CONFIG_CLASS}",
                         AUTO_CLASS: "modeling_llrc.LLRCModel"})
    cfg["llrc"] = info | {"plan": layers}
    return {"model_type": cfg.pop("model_type"), **cfg}


# --- writing -------------------------------------------------------------------------------------

def export_model(model, tokenizer, plan: RankPlan, out: str | Path, *, report: dict | None = None,
                 force: bool = False, merged_dense: bool = False, dtype=None,
                 source: dict | None = None, dense: StoredDense | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD) -> Path:
    """Save the compressed ``model`` (``plan`` applied) atomically into ``out``; with
    ``merged_dense`` save the plain original architecture with ``A B`` multiplied back.

    ``dtype`` is the dtype stored (None: the model's own; the CLI and the app pass the source
    model's). ``source`` describes the uncompressed model (``LoadedModel.source_info()``:
    ``model``, ``dtype``, ``weights_bytes``); report.json, config.json and the card state the
    compute and stored dtype and the weights size next to the source's. ``dense``: low-rank
    layers stored as one ``W = A B`` (module docstring). The weights are made and written one
    shard of at most ``max_shard_size`` at a time (``shards.py``)."""
    out = Path(out).expanduser().absolute()
    prepare_destination(out, force)          # before any work: a clear refusal
    shard_bytes(max_shard_size)
    store = None if dtype is None else dtype_name(dtype)
    stored_as = dense.names_in(plan) if dense else []   # may be plain modules already
    dense = None if merged_dense or not stored_as else dense   # merged: every layer dense
    missing = [n for n, lp in plan.layers.items()
               if not lp.dense and n not in stored_as and not isinstance(
                   model.get_submodule(n), (LowRankLinear, remote.LowRankLinear))]
    if missing:
        raise ValueError(f"layer {missing[0]!r} is planned low-rank but the model holds a dense "
                         "module: apply the plan first (pipeline.compress_)")

    def fill(tmp: Path) -> None:
        tensors = weights_to_save(model)
        compute = _dtype_name(tensors) if store is None else \
            "/".join(sorted({dtype_name(t.dtype) for t in tensors.values()
                             if t.is_floating_point()}))
        stored = store or compute
        kept = dense.stored_plan(plan) if dense else plan     # what the weights file holds
        meta = {"format": "pt", "llrc_format": str(remote.FORMAT_STORED_DENSE if dense
                                                   else remote.FORMAT)}
        recipe = _recipe(tensors, plan, model, getattr(torch, stored),
                         None if merged_dense else stored_as if dense else [])
        if not merged_dense:
            meta["llrc_layers"] = json.dumps({n: lp.kept for n, lp in plan.layers.items()})
        files = write_shards(tmp, recipe, meta, max_shard_size)
        storage = {"dtype": stored, "compute_dtype": compute, "weights_files": len(files),
                   "weights_bytes": sum((tmp / f).stat().st_size for f in files),
                   "stored_ratio_linear": 1.0 if merged_dense else kept.ratio("linear"),
                   "stored_ratio_model": 1.0 if merged_dense else kept.ratio("model"),
                   "source": source_of(model, plan, source)}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        plan.save(tmp / "rank_plan.json")
        (tmp / "rank_plan.csv").write_text(plan.to_csv())
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report | {"storage": storage}, indent=1,
                                                        default=str))
        if not merged_dense:
            shutil.copyfile(MODELING_FILE, tmp / "modeling_llrc.py")
        cfg = _config_dict(model, plan, storage, merged_dense, report, dense)
        (tmp / "README.md").write_text(model_card(cfg, plan, recipe.meta(), out.name))
        if not merged_dense:   # config.json last: the manifest lists every other file but
            cfg["llrc"]["files"] = {p.name: p.stat().st_size   # the card (free to edit)
                                    for p in sorted(tmp.iterdir()) if p.name != "README.md"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))

    return atomic_folder(out, fill, force)


# --- loading without remote code -----------------------------------------------------------------

def load_compressed(path: str | Path, device: str | None = None, dtype=None):
    """Load an export folder with llrc_core's own layers (no remote code runs). Returns
    ``(model, tokenizer, plan)`` in the stored dtype, or ``dtype`` when given (the compute
    dtype); a merged-dense folder loads as the plain architecture."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path / 'config.json')!r} is missing: not an export folder")
    raw = json.loads((path / "config.json").read_text())
    kind = export_kind(path)
    if kind is None:
        raise ModelLoadError(f"{str(path)!r} has no 'llrc' or 'llrc_merged' section in its "
                             "config.json: not an LLRC export (load it with load_model)")
    try:
        model = (_load_merged if kind == "merged" else _load_low_rank)(path, raw)
    except remote.LLRCExportError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    plan_dict = raw["llrc"]["plan"] if kind == "low-rank" else json.loads(
        (path / "rank_plan.json").read_text())
    model.to(device or "cpu", getattr(torch, dtype_name(dtype)) if dtype else None).eval()
    # the base config, never AutoConfig on the folder: its model_type "llrc" is remote code
    tok = AutoTokenizer.from_pretrained(path, config=model.config) \
        if (path / "tokenizer_config.json").exists() else None
    return model, tok, RankPlan.from_dict(plan_dict)


def load_dense(path: str | Path, device: str | None = None, dtype=None):
    """An export as a plain model of its base architecture, every low-rank layer multiplied
    back (``W = A B`` in float64, as a merged export is written): what compressing an export
    again starts from. Returns ``(model, tokenizer, plan)``; ``dtype`` None keeps the stored
    one."""
    import copy

    import transformers
    model, tok, plan = load_compressed(path, dtype=dtype)
    if export_kind(path) == "low-rank":
        want = next(model.parameters()).dtype
        config = copy.deepcopy(model.config)
        del config.llrc                       # a plain config: no plan travels on
        dense = getattr(transformers, base_class_name(model))._from_config(config, dtype=want)
        _load_state(dense, [merged_weights(weights_to_save(model), plan, model, want)])
        model = dense
    return model.to(device or "cpu").eval(), tok, plan


def _load_merged(path: Path, raw: dict):
    import transformers
    base = getattr(transformers, raw["llrc_merged"]["base_class"])
    if not remote.has_weights(str(path)):
        raise remote.LLRCExportError(f"{WEIGHTS} is missing: export again")
    return base.from_pretrained(path, dtype=getattr(torch, raw["llrc_merged"]["dtype"]))


def _load_low_rank(path: Path, raw: dict):
    import transformers

    sec = remote.llrc_section(raw)
    specs = remote.check_folder(str(path), sec)
    base = getattr(transformers, str(sec.get("base_class")), None)
    if base is None:
        raise remote.LLRCExportError(f"base architecture {sec.get('base_class')!r} is not in "
                                     f"transformers {transformers.__version__}; upgrade it")
    config = remote.base_config(raw)          # from the dict: no AutoConfig on "llrc"
    config.name_or_path = str(path)
    model = base._from_config(config, dtype=getattr(torch, sec["dtype"]))
    remote.swap_low_rank_(model, specs, make_layer=LowRankLinear)
    remote.check_weights(str(path), specs, model, sec)
    files, _ = remote.weight_files(str(path))
    _load_state(model, (load_file(f) for f in files))      # one shard in memory at a time
    return model


def _load_state(model, states) -> None:
    """Load the dicts ``states`` (the shards) strictly, except keys tied to a loaded tensor
    (written once)."""
    seen, unexpected = set(), []
    for state in states:
        unexpected += model.load_state_dict(state, strict=False).unexpected_keys
        seen |= set(state)
    ptr = {k: v.data_ptr() for k, v in model.state_dict().items()}
    loaded = {ptr[k] for k in seen if k in ptr}
    untied = [k for k in ptr if k not in seen and ptr[k] not in loaded]
    if unexpected or untied:
        raise remote.LLRCExportError(f"weights do not match {type(model).__name__}: missing "
                                     f"{untied[:3]}, unexpected {unexpected[:3]}")
