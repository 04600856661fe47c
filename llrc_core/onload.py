"""Sequential onloading: the dense weights wait in CPU memory and visit the device as needed.

A model larger than its GPU (Llama-2-70B's 128 GiB of bf16 weights on one 80 GB card) still
compresses: ``enable_`` keeps what lies outside the transformer blocks (embeddings, final
norm, LM head, rotary tables: the "frame") on the execution device, and offloads each block as
accelerate's ``cpu_offload`` does: its weights move to CPU memory, the block's parameters become
meta tensors, and every submodule brings its own weights to the device for its forward pass
and drops them after (accelerate's ``AlignDevicesHook``, as llm-compressor's sequential
pipeline uses it). The device then holds the frame and one layer's weights at a time.

The rest of the package works on such a model through these helpers:

* ``onloaded(module)``: the module's own weights present on its execution device for a
  block of code (decomposition reads ``W``; the masked layers read the bias);
  accelerate's ``align_module_device``, for every submodule that has offloaded weights;
* ``named_weights(model)``: every weight by name, offloaded ones read in CPU memory (a
  fingerprint of the weights, as STRS's cache key takes);
* ``offload_like_(new, old)``: a module swapped in for an offloaded one (the low-rank layer
  ``apply`` makes) is offloaded the same way, so the compressed model stays in CPU memory too;
* ``disable_``: every weight back in CPU memory as a plain tensor and the hooks removed (the
  model as ``load_model`` left it on the CPU), e.g. before an export.

Mask training needs no onloading: the target layers it trains are swapped for masked layers
that hold their own factors (``masked.py``); only the blocks' norms visit the device, and
autograd keeps the copies its backward pass needs. The dense weights of a target never
return to the device while masks train.

Loading is lazy: transformers memory-maps a safetensors checkpoint loaded on the CPU in its
own dtype, and ``enable_`` keeps those tensors as they are, so the waiting blocks are pages of
the checkpoint file that the kernel reads as each block is onloaded (and may drop again), not
a copy (``tests/test_onload.py`` checks the addresses; the planner's ``mapped_host_bytes``).
A run in another dtype (a float16 Llama-2 checkpoint run in bfloat16) stays lazy too:
``load_sequential`` loads the checkpoint in its own dtype and ``enable_(dtype=...)`` gives the
blocks' placeholders the run's dtype, so each weight is cast as it is onloaded (accelerate's
``set_module_tensor_to_device`` casts a value to its placeholder's dtype): one layer's copy
at a time instead of the whole model's.

On a CPU the same hooks run with the CPU as execution device: weights are meta tensors
between forward passes exactly as on a GPU, which is how the tests check that nothing reads a
weight without onloading it.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from accelerate.hooks import attach_align_device_hook, remove_hook_from_module
from accelerate.utils import align_module_device, has_offloaded_params, named_module_tensors
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .models import find_blocks

_ATTR = "_llrc_onload"       # on the model: the execution device while enabled


def execution_device(model: nn.Module) -> torch.device | None:
    """Where an onloaded model computes (``None``: the model is not onloaded sequentially)."""
    return getattr(model, _ATTR, None)


def enable_(model: nn.Module, device: torch.device | str,
            dtype: torch.dtype | None = None) -> nn.Module:
    """The frame on ``device``; every block's weights in CPU memory, onloaded per submodule
    for its forward pass. The model must sit in CPU memory (``load_model(device="cpu")``).
    ``dtype``: the run's dtype when the weights are stored in another: the frame is cast now,
    the blocks' weights wait as they are and are cast as they are onloaded."""
    device = torch.device(device)
    if execution_device(model) is not None:
        raise ValueError("the model is already onloaded sequentially")
    _, blocks = find_blocks(model)
    cast = _caster(model, dtype)
    _frame_to(model, {id(b) for b in blocks}, lambda t: cast(t).to(device))
    for block in blocks:
        _offload(block, device)
        if dtype is not None:
            _to_run_dtype_(block, cast, dtype)
    object.__setattr__(model, _ATTR, device)    # plain attribute, not a submodule
    return model


def load_sequential(source, device: str | None = None, dtype=None, **kw):
    """``models.load_model`` into CPU memory, then ``enable_`` on ``device``;
    ``LoadedModel.device`` is the execution device and ``dtype`` the compute dtype of
    ``device``. The checkpoint is loaded in the dtype it stores (memory-mapped, not copied)
    and cast layer by layer as it is onloaded, unless the model keeps some modules in
    float32 (transformers' ``_keep_in_fp32_modules``): then it is loaded cast, as a copy."""
    from dataclasses import replace

    from .models import load_model, pick_device, pick_dtype
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    loaded = load_model(source, "cpu", dt, stored_dtype=True, **kw)
    model = loaded.model
    if loaded.dtype != dt and (getattr(model, "_keep_in_fp32_modules", None)
                               or getattr(model, "_keep_in_fp32_modules_strict", None)):
        loaded = load_model(source, "cpu", dt, **kw)   # rare: transformers' own cast rules
    enable_(loaded.model, dev, dt if loaded.dtype != dt else None)
    return replace(loaded, device=dev, dtype=dt)


def _caster(model: nn.Module, dtype: torch.dtype | None):
    """``t -> t`` in ``dtype`` for the floating parameters and persistent buffers of
    ``model`` (what a checkpoint holds and ``from_pretrained(dtype=...)`` casts); buffers a
    model computes for itself (rotary frequencies) keep their dtype."""
    if dtype is None:
        return lambda t: t
    own = {id(b) for m in model.modules() for n, b in m._buffers.items()
           if b is not None and n in m._non_persistent_buffers_set}
    return lambda t: t.to(dtype) if t.is_floating_point() and id(t) not in own else t


def _to_run_dtype_(module: nn.Module, cast, dtype: torch.dtype) -> None:
    """An offloaded module in the run's dtype: its buffers (not offloaded) cast now by
    ``cast``; the meta placeholders of its floating weights take ``dtype``, so onloading
    casts each weight to it (``set_module_tensor_to_device`` casts to the placeholder's)."""
    for m in module.modules():
        m._buffers.update({n: cast(t) for n, t in m._buffers.items() if t is not None})
        for name, p in m.named_parameters(recurse=False):
            if p.is_meta and p.is_floating_point() and p.dtype != dtype:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, dtype=dtype),
                                                   requires_grad=p.requires_grad)


def _frame_to(module: nn.Module, blocks: set[int], fn) -> None:
    """Apply ``fn`` (move, cast) to every tensor outside the blocks, in place (``_apply``
    keeps each parameter object, so tied weights such as embedding and LM head stay one)."""
    if id(module) in blocks:
        return
    if not any(id(m) in blocks for m in module.modules()):
        module._apply(fn)
        return
    module._apply(fn, recurse=False)                          # its own tensors only
    for child in module.children():
        _frame_to(child, blocks, fn)


@contextmanager
def onloaded(module: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Within the block, ``module``'s offloaded weights are present (on ``device``, default
    their execution device); a module that is not offloaded is left as it is, wherever it
    is (``device`` then does nothing)."""
    with ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(
                    m, None if device is None else torch.device(device)))
        yield module


def offload_like_(new: nn.Module, old: nn.Module) -> nn.Module:
    """Offload ``new`` (sitting in CPU memory) as ``old`` is offloaded, if it is: all its
    weights visit together for its own forward pass (``apply.LowRankLinear`` reads its
    children's weights without calling them)."""
    hooked = next((m for m in old.modules() if has_offloaded_params(m)), None)
    if hooked is not None:
        _offload(new, hooked._hf_hook.execution_device, whole=True)
    return new


def _offload(module: nn.Module, device: torch.device, whole: bool = False) -> None:
    """accelerate's ``cpu_offload`` without its outer hook (which only returns outputs to the
    input's device, here the same one): the module's state dict stays in CPU memory (no copy
    of what is already there) and each submodule with weights onloads its own for its
    forward pass; ``whole``: the module onloads all its weights for its own forward."""
    weights = {name: t.to("cpu") for name, t in module.state_dict().items()}
    attach_align_device_hook(module, execution_device=device, offload=True, weights_map=weights,
                             preload_module_classes=[type(module).__name__] if whole else None)


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()``, an offloaded weight read where it waits (CPU memory)
    instead of as its meta placeholder; nothing is moved to the device."""
    inside, seen = set(), set()
    for prefix, m in model.named_modules():
        if id(m) in inside:
            continue
        dot = f"{prefix}." if prefix else ""
        if has_offloaded_params(m):
            hook = m._hf_hook
            if hook.place_submodules:            # the module onloads its children's weights
                inside.update(id(x) for x in m.modules())
            for name, _ in m.named_parameters(recurse=hook.place_submodules):
                yield dot + name, hook.weights_map[name]
            continue
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:                # tied weights once, as named_parameters
                seen.add(id(p))
                yield dot + name, p


def disable_(model: nn.Module) -> nn.Module:
    """Every weight back in CPU memory as a plain tensor, every hook removed; the swapped-out
    originals kept for ``apply.restore_`` too."""
    from .apply import originals_of
    if execution_device(model) is None:
        return model
    for root in [model, *originals_of(model).values()]:
        for m in root.modules():
            if has_offloaded_params(m):
                hook = m._hf_hook
                for name, _ in named_module_tensors(m, include_buffers=hook.offload_buffers,
                                                    recurse=hook.place_submodules,
                                                    remove_non_persistent=True):
                    set_module_tensor_to_device(m, name, "cpu", value=hook.weights_map[name])
            remove_hook_from_module(m)
        root.to("cpu")
    object.__delattr__(model, _ATTR)
    return model
