"""README.md of an export folder: what it holds (method, ratios, dtypes, sizes next to the
source's, perplexity with the dtype it was computed in) and how to load it both ways."""
from __future__ import annotations

import json
from pathlib import Path

from .plan import RankPlan


def model_card(cfg: dict, plan: RankPlan, tensors: dict, name: str) -> str:
    """README.md: what the folder holds and how to load it both ways."""
    merged = "llrc_merged" in cfg
    info = cfg["llrc_merged" if merged else "llrc"]
    params = sum(t.numel() for t in tensors.values())
    ppl, storage = info["ppl"], info["storage"]
    src = storage["source"]
    rows = [("base architecture", f"`{info['base_class']}` ({info['base_model_type']})"),
            ("rank selection", f"{info['method']} ({info['selection']})"),
            ("decomposition", info["decomposition"]),
            ("kept parameters, target linear layers (rho_linear)", f"{info['ratio_linear']:.4f}"),
            ("kept parameters, whole model (rho_model)", f"{info['ratio_model']:.4f}"),
            ("parameters stored", f"{params:,} in {info['dtype']}"
                                  + (" (every weight dense: stored ratio 1.0)" if merged else "")),
            ("computed in / stored in", f"{storage['compute_dtype']} / {storage['dtype']}"),
            ("weights file" + ("s" if storage.get("weights_files", 1) > 1 else ""),
             (f"{storage['weights_files']} shards, " if storage.get("weights_files", 1) > 1
              else "") + f"{_mb(storage['weights_bytes'])} (source"
                             + (f" `{src['model']}`" if src.get("model") else "")
                             + f": {_mb(src['weights_bytes'])} in {src['dtype']}, "
                               f"{src.get('weights_from', 'measured')})"),
            ("layers low-rank / dense", f"{sum(not lp.dense for lp in plan.layers.values())} / "
                                        f"{sum(lp.dense for lp in plan.layers.values())}")]
    rows += _stored_dense_rows(info)
    on = f" on `{Path(str(ppl['eval_text'])).name}`" if "eval_text" in ppl else ""
    rows += [(f"perplexity {'before' if k == 'ppl_before' else 'after'} compression{on}, "
              f"computed in {storage['compute_dtype']}", f"{v:.3f}")
             for k, v in ppl.items() if k.startswith("ppl_")]
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
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

The folder's `model_type` is `llrc`: without `trust_remote_code=True` transformers refuses it
(rather than building a plain `{info['base_class']}` with random layers).

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


def _stored_dense_rows(info: dict) -> list[tuple[str, str]]:
    """Rows for low-rank layers stored dense (``W = A B``) because they ran slower factorised:
    the recomputed stored ratios and the rule, so that the change is never silent."""
    rule, storage = info.get("stored_dense"), info["storage"]
    if not rule:
        return []
    names = ", ".join(f"`{n}`" for n in rule["layers"])
    return [("stored ratio after storing slow layers dense (rho_linear / rho_model)",
             f"{storage['stored_ratio_linear']:.4f} / {storage['stored_ratio_model']:.4f} "
             f"(selected: {info['ratio_linear']:.4f} / {info['ratio_model']:.4f})"),
            ("layers stored dense as `W = A B`",
             f"{len(rule['layers'])}: {names}; each ran slower factorised than dense on "
             f"{rule['device']} ({rule['dtype']}, {rule['batch']} x {rule['tokens']} tokens) "
             f"and saved under {rule['dense_below']:.0%} of its weights; outputs unchanged "
             "(timings: config.json `llrc.stored_dense`)")]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
