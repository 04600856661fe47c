"""The weights an export writes, made and written one shard at a time.

The tensors are first described without being made (``WeightsRecipe.meta``: each key's shape
and stored dtype on the meta device), split into shards by huggingface_hub's
``split_torch_state_dict_into_shards`` (the splitter transformers' ``save_pretrained`` uses),
then made and written shard by shard (``write_shards``): a layer multiplied back (``W = A B``)
or a tensor cast to the stored dtype exists only while its shard is written. safetensors
writes a tensor kept as it is straight from its memory, so an export needs the compressed
model plus at most one shard of made tensors (5 GB by default), where making them all first
needed up to the model a second time (``planner.py`` counts one shard: for Llama-2-70B with
sequential onloading, 261 GiB of host memory instead of 384).

One shard is ``model.safetensors`` with the LLRC metadata in its header. Several are
``model-0000i-of-0000n.safetensors`` with transformers' ``model.safetensors.index.json``,
whose ``metadata`` carries what the single file's header would (the kept indices the weights
were written for); each shard's header says ``format: pt`` as transformers requires. Stock
transformers, the remote-code loader and ``export.load_compressed`` read both layouts
(``hf_remote.modeling_llrc.weight_files``).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file


DEFAULT_MAX_SHARD = "5GB"         # transformers' and the Hub's default shard size
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def shard_bytes(size: int | str) -> int:
    """``"5GB"`` -> 5,000,000,000 bytes (the Hub's decimal units), ``1000`` -> 1000. Written
    here because huggingface_hub keeps its parser private; checked before an export starts."""
    text = str(size).strip().upper()
    unit = _UNITS.get(text[-2:], 1)
    try:
        value = float(text[:-2] if text[-2:] in _UNITS else text) * unit
    except ValueError:
        value = -1.0
    if not 1 <= value < float("inf"):
        raise ValueError(f"max shard size {size!r} is not a size: give bytes or a size such as "
                         "'5GB' or '500MB'")
    return int(value)


def write_buffer_bytes(weights_bytes: int, max_shard_size: int | str = DEFAULT_MAX_SHARD) -> int:
    """CPU memory an export needs beyond the model: the bytes of one shard being written."""
    return min(weights_bytes, shard_bytes(max_shard_size))


@dataclass
class WeightsRecipe:
    """What the weights files hold, key by key: ``sources`` (the state dict, tied tensors
    once) with the layers of ``merged`` multiplied back (``{name}.weight = A B`` in float64,
    transposed for a GPT-2 ``Conv1D``; ``{name}.bias`` from ``A.bias``), every floating tensor
    in ``dtype`` (None: each its own; a merged layer: its factors')."""

    sources: dict[str, torch.Tensor]
    merged: dict[str, bool]               # layer name -> stored transposed (Conv1D)
    dtype: torch.dtype | None = None

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], merge, is_conv1d: Callable[[str], bool],
           dtype: torch.dtype | None = None) -> WeightsRecipe:
        """``merge``: layer names to multiply back; a layer already held dense is skipped."""
        merged = {n: is_conv1d(n) for n in merge if f"{n}.A.weight" in tensors}
        return cls(tensors, merged, dtype)

    def _layer(self, key: str) -> str | None:
        name, _, leaf = key.rpartition(".")
        return name if name in self.merged and leaf in ("weight", "bias") else None

    def keys(self) -> list[str]:
        factors = {f"{n}.{leaf}" for n in self.merged for leaf in ("A.weight", "B.weight",
                                                                   "A.bias")}
        out = [k for k in self.sources if k not in factors]
        for name in self.merged:
            out.append(f"{name}.weight")
            if f"{name}.A.bias" in self.sources:
                out.append(f"{name}.bias")
        return sorted(out)

    def _want(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

    def meta(self) -> dict[str, torch.Tensor]:
        """Every key's shape and stored dtype, on the meta device: nothing is made."""
        out = {}
        for key in self.keys():
            name = self._layer(key)
            if name is None:
                t = self.sources[key]
                out[key] = torch.empty(t.shape, dtype=self._want(t), device="meta")
                continue
            A, B = self.sources[f"{name}.A.weight"], self.sources[f"{name}.B.weight"]
            if key.endswith(".bias"):
                shape, like = (A.shape[0],), self.sources[f"{name}.A.bias"]
            else:
                shape, like = (A.shape[0], B.shape[1]), A                  # (m, n)
                shape = shape[::-1] if self.merged[name] else shape
            out[key] = torch.empty(shape, dtype=self._want(like), device="meta")
        return out

    def make(self, key: str) -> torch.Tensor:
        """The tensor written under ``key``, on CPU, contiguous, in its stored dtype."""
        name = self._layer(key)
        if name is None:
            return cast(key, self.sources[key], self._want(self.sources[key]))
        if key.endswith(".bias"):
            bias = self.sources[f"{name}.A.bias"]
            return cast(key, bias, self._want(bias))
        A, B = self.sources[f"{name}.A.weight"], self.sources[f"{name}.B.weight"]  # (m,k),(k,n)
        W = A.double() @ B.double()                                               # (m, n)
        return cast(key, W.t() if self.merged[name] else W, self._want(A))

    def make_all(self) -> dict[str, torch.Tensor]:
        return {k: self.make(k) for k in self.keys()}


def cast(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on CPU, contiguous, in ``dtype`` (a new tensor only where needed); a value that
    does not fit the dtype (inf after the cast) is an error naming the tensor."""
    c = t.detach().to("cpu", dtype).contiguous()
    if c.is_floating_point() and c.dtype != t.dtype and not torch.isfinite(c).all() \
            and torch.isfinite(t).all():
        raise ValueError(f"{key} overflows {str(dtype).removeprefix('torch.')} (largest |value| "
                         f"{t.abs().max().item():.3g}); export in a wider dtype "
                         "(--dtype float32 or bfloat16)")
    return c


def write_shards(folder: Path, recipe: WeightsRecipe, metadata: dict[str, str],
                 max_shard_size: int | str = DEFAULT_MAX_SHARD) -> list[str]:
    """Write ``recipe`` into ``folder`` one shard at a time; returns the weights files'
    names. ``metadata`` goes into the single file's header, or the index of several shards."""
    from .hf_remote.modeling_llrc import INDEX, WEIGHTS    # imports transformers: not at once
    split = split_torch_state_dict_into_shards(recipe.meta(),
                                               max_shard_size=shard_bytes(max_shard_size),
                                               filename_pattern="model{suffix}.safetensors")
    for fname, keys in split.filename_to_tensors.items():
        shard = {k: recipe.make(k) for k in keys}   # made now, dropped after the write
        save_file(shard, str(folder / fname),
                  metadata=metadata if not split.is_sharded else {"format": "pt"})
        del shard
    if not split.is_sharded:
        return [WEIGHTS]
    index = {"metadata": {**split.metadata, **metadata},
             "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return list(split.filename_to_tensors)
