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
    dtype: torch.dtype                       # the compute dtype (what the model is in now)
    causal: bool
    seconds: float
    source_dtype: torch.dtype | None = None  # the dtype the source stores (config, weights)
    source_bytes: int | None = None          # its safetensors files, when a local folder

    def source_info(self) -> dict:
        """The source as an export records it: ``model``, ``dtype``, ``weights_bytes`` (the
        safetensors files of a local folder, else parameters x bytes per number) and how
        that size was found."""
        dt = self.source_dtype or self.dtype
        if not self.source_bytes:
            return source_estimate(self.source, count_params(self.model), dt)
        return {"model": self.source, "dtype": str(dt).removeprefix("torch."),
                "weights_bytes": self.source_bytes, "weights_from": "safetensors files"}


def source_estimate(name: str | None, params: int, dtype: torch.dtype) -> dict:
    """A source's weights size when no files tell it: parameters x bytes per number."""
    return {"model": name, "dtype": str(dtype).removeprefix("torch."),
            "weights_bytes": params * dtype.itemsize,
            "weights_from": "parameters x bytes per number"}


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
    """A path rather than a Hub id: absolute or relative markers, more than one ``/``, or a
    first component that exists here (``assets/demo_model`` when ``assets/`` exists)."""
    return (src.startswith((".", "/", "~")) or src.count("/") > 1 or Path(src).exists()
            or ("/" in src and Path(src.split("/")[0]).expanduser().is_dir()))


def resolve_source(source: str | Path) -> str:
    """A local folder (checked at once, with the nearest existing name as a hint) or a Hub
    id, unchanged; ``'minilm'`` names the installed MiniLM package's folder
    (``fidelity.resolve_model``), so every command and the studio take it."""
    from .fidelity import resolve_model
    src = resolve_model(str(source))
    if not _looks_local(src):
        return src
    path = Path(src).expanduser()
    if not path.is_dir():
        import difflib
        parent = path.parent if path.parent.is_dir() else None
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()
                                                     if p.is_dir()], 1) if parent else []
        hint = f" (did you mean {str(parent / near[0])!r}?)" if near else ""
        raise ModelLoadError(f"model folder not found: {str(path)!r}{hint}; pass an existing "
                             "folder with config.json and weights, or a Hub id such as 'gpt2'")
    return str(path)


def read_config(src: str, trust_remote_code: bool = False):
    """The model's config (no weights read); of an LLRC low-rank export, its base model's
    (the shapes it has once loaded dense with ``allow_compressed``)."""
    from transformers import AutoConfig

    from .export import base_config_of, export_kind
    if export_kind(src) == "low-rank":      # model_type "llrc" is remote code: not AutoConfig
        return base_config_of(src)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError with long texts
        raise ModelLoadError(f"could not read a model config from {src!r}: {exc}. Check the "
                             "path or Hub id (Hub ids need network access)") from exc


def auto_class(config, causal: bool | None = None):
    """``(AutoModelForCausalLM or AutoModel, causal)``: causal LMs (and BERT with
    ``is_decoder``) load with a head, encoders without."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if causal is None:
        causal = bool(getattr(config, "is_decoder", False)) or (
            config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "bert")
    return (AutoModelForCausalLM if causal else AutoModel), causal


def skeleton(source: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device from its config alone: shapes and parameter counts
    of any size of model, no memory, no weights read (planning, validation)."""
    return skeleton_of(read_config(resolve_source(source), trust_remote_code),
                       trust_remote_code)


def skeleton_of(config, trust_remote_code: bool = False) -> nn.Module:
    """``skeleton`` from a config already read (e.g. a loaded model's)."""
    auto, _ = auto_class(config)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def source_dtype(src: str, config) -> torch.dtype | None:
    """The dtype the source stores: its config's ``dtype`` / ``torch_dtype``, else the first
    floating tensor in a local folder's safetensors header (None when neither says)."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            value = getattr(torch, value)
        if isinstance(value, torch.dtype):
            return value
    from safetensors import safe_open
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
             "F64": torch.float64}
    for f in sorted(Path(src).glob("*.safetensors")) if Path(src).is_dir() else []:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if st.get_slice(key).get_dtype() in names:
                    return names[st.get_slice(key).get_dtype()]
    return None


def _source_bytes(src: str) -> int | None:
    """The safetensors files of a local folder, in bytes (None for a Hub id or none)."""
    files = sorted(Path(src).glob("*.safetensors")) if Path(src).is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def refuse_export(src: str, allow_compressed: bool = False) -> None:
    """``ModelLoadError`` for an LLRC low-rank export unless ``allow_compressed`` (reads only
    its config.json): compressing a compressed model must be asked for."""
    from .export import describe_export, export_kind
    if export_kind(src) == "low-rank" and not allow_compressed:
        raise ModelLoadError(
            f"{src!r} is an LLRC export ({describe_export(src)}), not a base model: evaluate it "
            f"with `llrc eval --model {src}`, or pass --allow-compressed "
            "(allow_compressed=True) to load it as a dense model and compress it again")


def _load_export(src: str, allow_compressed: bool, dev, dt) -> LoadedModel | None:
    """An LLRC low-rank export is refused before any weight is read, or with
    ``allow_compressed`` loaded as a plain dense model (``A B`` multiplied back); None for
    anything else."""
    from .export import export_info, export_kind, load_dense
    if export_kind(src) != "low-rank":
        return None
    refuse_export(src, allow_compressed)
    t0 = time.time()
    model, tok, _ = load_dense(src, dev, dt)
    stored = DTYPES[export_info(src)["dtype"]]
    return LoadedModel(model, tok, src, dev, dt, True, time.time() - t0, stored,
                       _source_bytes(src))


def load_model(source: str | Path, device: str | None = None, dtype=None,
               trust_remote_code: bool = False, causal: bool | None = None,
               allow_compressed: bool = False, stored_dtype: bool = False,
               device_map: dict | None = None) -> LoadedModel:
    """Load a model and tokenizer from a local folder or a Hub id.

    Causal LMs load through ``AutoModelForCausalLM``; encoders such as BERT (without
    ``is_decoder``) through ``AutoModel``. ``trust_remote_code`` stays off unless asked for.
    An LLRC low-rank export is refused with a message saying what to do, unless
    ``allow_compressed`` (then it loads as a dense model, its factors multiplied back).
    ``source_dtype`` records the dtype the source stores, so an export can keep it.
    ``stored_dtype``: load in that dtype instead of ``dtype`` (a safetensors checkpoint is
    then memory-mapped, not copied: ``onload.load_sequential`` casts layer by layer);
    ``LoadedModel.dtype`` says which was used. ``device_map``: module name -> device, the
    blocks placed across GPUs (``spread.py``), dispatched by accelerate's hooks;
    ``LoadedModel.device`` is then the device of the first weights (the embeddings).
    """
    from transformers import AutoTokenizer

    src = resolve_source(source)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    exported = _load_export(src, allow_compressed, "cpu" if device_map else dev, dt)
    if exported is not None:
        if device_map:
            from accelerate import dispatch_model
            dispatch_model(exported.model, device_map)
            exported.device = next(exported.model.parameters()).device
        find_targets(exported.model)
        return exported
    t0 = time.time()
    config = read_config(src, trust_remote_code)
    auto, causal = auto_class(config, causal)
    stored = source_dtype(src, config)
    if stored_dtype and stored is not None and stored.is_floating_point:
        dt = stored
    try:
        model = auto.from_pretrained(src, dtype=dt, trust_remote_code=trust_remote_code,
                                     **({"device_map": device_map} if device_map else {}))
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UnsupportedModelError(f"{config.model_type!r} cannot be loaded with "
                                    f"{auto.__name__}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not load weights or tokenizer from {src!r}: {exc}") from exc
    if device_map:       # from_pretrained placed and dispatched it
        dev = next(model.parameters()).device
    else:
        model.to(dev)
    model.eval()
    find_targets(model)  # fail early on an architecture without target layers
    return LoadedModel(model, tokenizer, src, dev, dt, causal, time.time() - t0,
                       stored or next(model.parameters()).dtype,
                       _source_bytes(src))


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
