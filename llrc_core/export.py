"""Write a compressed model to a folder that reloads anywhere, and load it back.

A factorised export folder holds:
  model.safetensors   factor weights ``{layer}.A.weight (m, k)``, ``{layer}.B.weight (k, n)``,
                      ``{layer}.A.bias``; original weights for dense layers and everything else
                      (tied weights once); metadata: the kept indices each layer was written for
  config.json         the base config + ``auto_map`` to ``modeling_llrc.py`` + an ``llrc``
                      section: base class, dtype, the rank plan (shape, kept indices, rank per
                      layer), method and settings, both ratios, the files written with sizes
  modeling_llrc.py    self-contained loader for ``trust_remote_code=True`` (llrc_core/hf_remote)
  tokenizer files, generation_config.json, rank_plan.json, rank_plan.csv, report.json, README.md

``merged_dense=True`` writes instead a plain model of the original architecture (``A B``
multiplied back), loadable by any tool without remote code; it saves no memory.

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
from safetensors.torch import load_file, save_file

from .apply import LowRankLinear
from .errors import ModelLoadError
from .files import atomic_folder, prepare_destination
from .hf_remote import MODELING_FILE
from .hf_remote import modeling_llrc as remote
from .plan import RankPlan

WEIGHTS = remote.WEIGHTS
AUTO_CLASS = "AutoModelForCausalLM"


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
    transformers loads and ties from), contiguous and on CPU."""
    targets = _tied_targets(model)
    groups: dict[tuple, list[str]] = {}
    state = model.state_dict()
    for key, t in state.items():
        groups.setdefault((t.device, t.data_ptr(), t.dtype, tuple(t.shape)), []).append(key)
    out = {}
    for keys in groups.values():
        keep = next((k for k in keys if k not in targets), keys[0])
        out[keep] = state[keep].detach().to("cpu").contiguous()
    return dict(sorted(out.items()))


def merged_weights(tensors: dict[str, torch.Tensor], plan: RankPlan, model) -> dict:
    """Factor weights multiplied back: ``W = A B`` (in float64, then the model's dtype) under
    the original key, transposed for GPT-2 style ``Conv1D`` layers."""
    out = dict(tensors)
    for name, lp in plan.layers.items():
        if lp.dense:
            continue
        A, B = out.pop(f"{name}.A.weight"), out.pop(f"{name}.B.weight")  # (m, k), (k, n)
        W = (A.double() @ B.double()).to(A.dtype)                         # (m, n)
        out[f"{name}.weight"] = W.t().contiguous() if _is_conv1d(model, name) else W
        if f"{name}.A.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.A.bias")
    return dict(sorted(out.items()))


def _is_conv1d(model, name: str) -> bool:
    from .apply import originals_of
    original = originals_of(model).get(name)
    if original is not None:
        return type(original).__name__ == "Conv1D"
    import transformers
    with torch.device("meta"):   # no memory: only the module types matter
        skeleton = getattr(transformers, base_class_name(model))._from_config(model.config)
    return type(skeleton.get_submodule(name)).__name__ == "Conv1D"


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the model mixes dtypes {sorted(map(str, dtypes))}; cast it to one "
                         "(model.to(torch.float16), ...) before exporting")
    return str(dtypes.pop()).removeprefix("torch.")


def _config_dict(model, plan: RankPlan, dtype: str, merged: bool, report: dict | None) -> dict:
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    base = base_class_name(model)
    for key in ("auto_map", "llrc", "llrc_merged", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(architectures=[base], dtype=dtype)
    info = {"format": remote.FORMAT, "base_class": base, "dtype": dtype,
            "method": plan.method, "decomposition": plan.decomposition,
            "selection": plan.selection, "settings": plan.meta,
            "ratio_linear": plan.ratio("linear"), "ratio_model": plan.ratio("model"),
            "ppl": {k: report[k] for k in ("ppl_before", "ppl_after", "eval_text")
                    if k in (report or {})}}
    if merged:
        cfg["llrc_merged"] = info | {"ranks": plan.ranks()}
        return cfg
    layers = plan.to_dict()
    for name, entry in layers["layers"].items():
        entry["rank"] = plan.layers[name].rank
    cfg["auto_map"] = {AUTO_CLASS: "modeling_llrc.LLRCModel"}
    cfg["llrc"] = info | {"plan": layers}
    return cfg


# --- writing -------------------------------------------------------------------------------------

def export_model(model, tokenizer, plan: RankPlan, out: str | Path, *, report: dict | None = None,
                 force: bool = False, merged_dense: bool = False) -> Path:
    """Save the compressed ``model`` (``plan`` applied) atomically into ``out``; with
    ``merged_dense`` save the plain original architecture with ``A B`` multiplied back."""
    out = Path(out).expanduser().absolute()
    prepare_destination(out, force)          # before any work: a clear refusal
    missing = [n for n, lp in plan.layers.items()
               if not lp.dense and not isinstance(model.get_submodule(n), (LowRankLinear,
                                                                            remote.LowRankLinear))]
    if missing:
        raise ValueError(f"layer {missing[0]!r} is planned low-rank but the model holds a dense "
                         "module: apply the plan first (pipeline.compress_)")

    def fill(tmp: Path) -> None:
        tensors = weights_to_save(model)
        dtype = _dtype_name(tensors)
        meta = {"format": "pt", "llrc_format": str(remote.FORMAT)}
        if merged_dense:
            tensors = merged_weights(tensors, plan, model)
        else:
            meta["llrc_layers"] = json.dumps({n: lp.kept for n, lp in plan.layers.items()})
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        plan.save(tmp / "rank_plan.json")
        (tmp / "rank_plan.csv").write_text(plan.to_csv())
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if not merged_dense:
            shutil.copyfile(MODELING_FILE, tmp / "modeling_llrc.py")
        cfg = _config_dict(model, plan, dtype, merged_dense, report)
        (tmp / "README.md").write_text(model_card(cfg, plan, tensors, out.name))
        if not merged_dense:   # config.json last: the manifest lists every other file but
            cfg["llrc"]["files"] = {p.name: p.stat().st_size   # the card (free to edit)
                                    for p in sorted(tmp.iterdir()) if p.name != "README.md"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))

    return atomic_folder(out, fill, force)


def model_card(cfg: dict, plan: RankPlan, tensors: dict, name: str) -> str:
    """README.md: what the folder holds and how to load it both ways."""
    merged = "llrc_merged" in cfg
    info = cfg["llrc_merged" if merged else "llrc"]
    params = sum(t.numel() for t in tensors.values())
    ppl = info["ppl"]
    rows = [("base architecture", f"`{info['base_class']}` ({cfg.get('model_type')})"),
            ("rank selection", f"{info['method']} ({info['selection']})"),
            ("decomposition", info["decomposition"]),
            ("kept parameters, target linear layers (rho_linear)", f"{info['ratio_linear']:.4f}"),
            ("kept parameters, whole model (rho_model)", f"{info['ratio_model']:.4f}"),
            ("parameters stored", f"{params:,} in {info['dtype']}"),
            ("layers low-rank / dense", f"{sum(not lp.dense for lp in plan.layers.values())} / "
                                        f"{sum(lp.dense for lp in plan.layers.values())}")]
    on = f" on `{Path(str(ppl['eval_text'])).name}`" if "eval_text" in ppl else ""
    rows += [(f"perplexity {'before' if k == 'ppl_before' else 'after'} compression{on}",
              f"{v:.3f}") for k, v in ppl.items() if k.startswith("ppl_")]
    if not any(k.startswith("ppl_") for k in ppl):
        rows.append(("perplexity", "not measured for this export"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    settings = json.dumps(info["settings"], indent=1, default=str) if info["settings"] else "{}"
    if merged:
        how = f"""This is a **merged dense** export: each low-rank layer's factors were multiplied
back (`W = A B`), so the folder is a plain `{info['base_class']}` that any tool loads. It keeps
the compressed model's outputs but not its memory saving.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```"""
    else:
        how = f"""Low-rank layers are stored as two factors, `B (k x n)` then `A (m x k)` with
the original bias, and keep exactly the singular-value indices listed in `config.json`
(`llrc.plan.layers`) and `rank_plan.csv`. Layers at or above break-even rank stay dense.

With stock transformers (runs `modeling_llrc.py` from this folder):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

Without remote code, with LLRC Studio installed:

```python
from llrc_core.export import load_compressed
model, tokenizer, plan = load_compressed("{name}")
```"""
    return f"""# {name}: low-rank compressed `{info['base_class']}`

Compressed with LLRC Studio by truncating singular values of the linear layers inside the
transformer blocks (embeddings, norms and the LM head are untouched).

| | |
|---|---|
{table}

Ratios count weight matrices of the target layers (`rho_linear`) and every parameter of the
model, tied weights once (`rho_model`).

## How to load

{how}

Weights are in safetensors only. The loaders check the folder first (files and sizes, layer
shapes, kept indices) and stop with an error naming the layer if anything was edited.

## Method settings

```json
{settings}
```
"""


# --- loading without remote code -----------------------------------------------------------------

def load_compressed(path: str | Path, device: str | None = None):
    """Load an export folder with llrc_core's own layers (no remote code runs). Returns
    ``(model, tokenizer, plan)``; a merged-dense folder loads as the plain architecture."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path / 'config.json')!r} is missing: not an export folder")
    raw = json.loads((path / "config.json").read_text())
    try:
        if "llrc_merged" in raw and "llrc" not in raw:
            model = _load_merged(path, raw)
        else:
            model = _load_low_rank(path, raw)
    except remote.LLRCExportError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    plan_dict = raw["llrc"]["plan"] if "llrc" in raw else json.loads(
        (path / "rank_plan.json").read_text())
    model.to(device or "cpu").eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() \
        else None
    return model, tok, RankPlan.from_dict(plan_dict)


def _load_merged(path: Path, raw: dict):
    import transformers
    base = getattr(transformers, raw["llrc_merged"]["base_class"])
    if not (path / WEIGHTS).is_file():
        raise remote.LLRCExportError(f"{WEIGHTS} is missing: export again")
    return base.from_pretrained(path, dtype=getattr(torch, raw["llrc_merged"]["dtype"]))


def _load_low_rank(path: Path, raw: dict):
    import transformers
    from transformers import AutoConfig

    sec = remote.llrc_section(raw)
    specs = remote.check_folder(str(path), sec)
    base = getattr(transformers, str(sec.get("base_class")), None)
    if base is None:
        raise remote.LLRCExportError(f"base architecture {sec.get('base_class')!r} is not in "
                                     f"transformers {transformers.__version__}; upgrade it")
    config = AutoConfig.from_pretrained(path)
    model = base._from_config(config, dtype=getattr(torch, sec["dtype"]))
    remote.swap_low_rank_(model, specs, make_layer=LowRankLinear)
    remote.check_weights(str(path / WEIGHTS), specs, model)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    ptr = {k: v.data_ptr() for k, v in model.state_dict().items()}
    loaded = {ptr[k] for k in state if k in ptr}
    untied = [k for k in missing if ptr[k] not in loaded]
    if unexpected or untied:
        raise remote.LLRCExportError(f"weights do not match {base.__name__}: missing "
                                     f"{untied[:3]}, unexpected {unexpected[:3]}")
    return model
