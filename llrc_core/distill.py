"""Hidden-state distillation for learned rank selection.

LLRC's targets are hidden states of the frozen original model at the middle block and at
the last (pre-logits) layer; ARS and ARA on an encoder use the last layer alone
(``selectors.learned.Objective``). They run through the model's base (``model.base_model``:
``LlamaModel``, ``BertModel``, ...), so the vocabulary projection never runs while training.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import inference_mode
from .models import find_blocks


def base_of(model: nn.Module) -> nn.Module:
    """The transformer without its LM head, when the model has one."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


DISTILL_AT = ("middle-last", "every", "last")


def distill_layers(model: nn.Module, at: str = "middle-last") -> tuple[int, ...]:
    """Indices into ``hidden_states`` (0 = embeddings): ``middle-last``, the middle block's
    output and the last (the paper); ``every``, every block's output; ``last``, the last
    alone (what ARS and ARA distil on an encoder)."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    if at == "every":
        return tuple(range(1, n + 1))
    if at == "last":
        return (n,)
    if at != "middle-last":
        raise ValueError(f"distill_at must be one of {DISTILL_AT}, got {at!r}")
    return max(n // 2, 1), n


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` has output embeddings (a causal LM's head), as an encoder has not;
    a model on the meta device answers too."""
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def output_head(model: nn.Module) -> nn.Module | None:
    """The part of ``model`` that maps the last hidden state to logits (``lm_head``; BERT's
    ``cls``, transform included), or ``None`` for a model without an LM head. It is the
    top-level child, other than the base, that holds the output embeddings."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    base = base_of(model)
    if out is None or base is model:
        return None
    return next((m for m in model.children()
                 if m is not base and any(x is out for x in m.modules())), None)


def hidden_at(model: nn.Module, ids: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """Hidden states ``(B, T, d)`` after the given layers (``output_hidden_states`` indices)."""
    out = base_of(model)(input_ids=ids, output_hidden_states=True, use_cache=False)
    return [out.hidden_states[i] for i in layers]


def precompute_targets(model: nn.Module, windows: torch.Tensor, layers: tuple[int, ...],
                       batch_size: int, store: torch.device | str | None = None
                       ) -> list[torch.Tensor]:
    """Targets over all windows, one ``(N, T, d)`` tensor per layer in the model's dtype, from
    the model in eval mode (no dropout) without gradients. ``store``: where they are kept
    (default the model's device; ``cpu`` offloads them batch by batch)."""
    device = next(model.parameters()).device
    store = device if store is None else torch.device(store)
    with inference_mode(model):
        parts = [[h.to(store) for h in hidden_at(model, ids.to(device), layers)]
                 for ids in windows.split(batch_size)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(layers))]
