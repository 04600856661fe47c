"""Run a model block by block: capture what enters the first block, then feed each block
the previous block's output. Used for calibration statistics (one block's hooks and Gram
matrices in memory at a time) and for re-running a model from a given block (STRS).

The capture is generic: a pre-hook on block 0 records its positional and keyword arguments
(attention mask, rotary embeddings, ...) and stops the forward pass; those arguments are the
same for every block, only the hidden states change.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    args: tuple       # positional args, hidden states first
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInput":
        return BlockInput((hidden,) + tuple(self.args[1:]), self.kwargs)


@contextmanager
def inference_mode(model: nn.Module):
    """Calibration context: eval, no grad, no KV cache; restores the training flag."""
    was_training = model.training
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    model.eval()
    if cfg is not None and use_cache is not None:
        cfg.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if cfg is not None and use_cache is not None:
            cfg.use_cache = use_cache


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList,
                         batches: list[torch.Tensor]) -> list[BlockInput]:
    """Arguments entering block 0, one entry per batch of input ids."""
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        if not args:  # hidden states passed by keyword
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(_device_of(model)))
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first transformer block was not reached by the forward pass")
    return captured


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(*inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
