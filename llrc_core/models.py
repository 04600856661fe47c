"""Load a model (Hub id or local folder) and discover its target linear layers.

Targets are found by inspection, not by a table per architecture: the transformer blocks are
the ``ModuleList`` holding the most linear layers, and every ``nn.Linear`` (or GPT-2 style
``Conv1D``, whose weight is stored transposed) inside a block is a target. Embeddings, norms
and the LM head sit outside the blocks and are never decomposed.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UnsupportedModelError



def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored (in, out)); matched by name so that
    importing this module does not import transformers."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Target:
    name: str        # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int       # index of the transformer block
    kind: str        # module type inside the block, e.g. "self_attn.q_proj"
    m: int           # out features
    n: int           # in features
    transposed: bool  # Conv1D: weight stored (n, m)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    device: torch.device
    dtype: torch.dtype
    causal: bool
    seconds: float


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the caller names one."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA by default."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _looks_local(src: str) -> bool:
    return src.startswith((".", "/", "~")) or src.count("/") > 1 or Path(src).exists()


def load_model(source: str | Path, device: str | None = None, dtype=None,
               trust_remote_code: bool = False, causal: bool | None = None) -> LoadedModel:
    """Load a model and tokenizer from a local folder or a Hub id.

    Causal LMs load through ``AutoModelForCausalLM``; encoders such as BERT (without
    ``is_decoder``) through ``AutoModel``. ``trust_remote_code`` stays off unless asked for.
    """
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src = str(Path(source).expanduser()) if _looks_local(str(source)) else str(source)
    if _looks_local(str(source)) and not Path(src).is_dir():
        raise ModelLoadError(f"model folder not found: {src!r}; pass an existing folder with "
                             "config.json and weights, or a Hub id such as 'gpt2'")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    t0 = time.time()
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError with long texts
        raise ModelLoadError(f"could not read a model config from {src!r}: {exc}. Check the "
                             "path or Hub id (Hub ids need network access)") from exc
    if causal is None:
        causal = bool(getattr(config, "is_decoder", False)) or (
            config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "bert")
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        model = auto.from_pretrained(src, dtype=dt, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UnsupportedModelError(f"{config.model_type!r} cannot be loaded with "
                                    f"{auto.__name__}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not load weights or tokenizer from {src!r}: {exc}") from exc
    model.to(dev).eval()
    find_targets(model)  # fail early on an architecture without target layers
    return LoadedModel(model, tokenizer, src, dev, dt, causal, time.time() - t0)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of transformer blocks: the one holding the most linear layers."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(is_linear(m) for m in mod.modules())
            if count > best_count:
                best, best_count = (name, mod), count
    if best is None:
        raise UnsupportedModelError(
            "no transformer blocks found (no ModuleList holding linear layers); module types "
            f"present: {sorted({type(m).__name__ for m in model.modules()})}")
    return best


def find_targets(model: nn.Module) -> list[Target]:
    """Every linear layer inside the transformer blocks, in module order."""
    prefix, blocks = find_blocks(model)
    targets = []
    for b, block in enumerate(blocks):
        for rel, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                m, n, t = mod.out_features, mod.in_features, False
            elif is_conv1d(mod):
                n, m = mod.weight.shape  # Conv1D stores (in, out)
                t = True
            else:
                continue
            targets.append(Target(f"{prefix}.{b}.{rel}", b, re.sub(r"\.\d+\.", ".", rel), m, n, t))
    if not targets:
        raise UnsupportedModelError(
            f"blocks found at {prefix!r} but no nn.Linear / Conv1D inside them; module types "
            f"present: {sorted({type(m).__name__ for m in blocks[0].modules()})}")
    return targets


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``W (m x n)``, y = W x, whatever the storage (Conv1D is transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def count_params(model: nn.Module) -> int:
    """All parameters, tied ones once (``parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def context_length(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return default
