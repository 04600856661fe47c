"""Perplexity over a text: non-overlapping windows of ``seq_len`` tokens, mean token NLL.

One evaluation contract for every face (``compress``, ``eval``, ``compare``, the studio): the
same default window length and count, and every perplexity reported with its window length,
window count and token total (``eval_info``), so two numbers are comparable or say why not.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .blocks import inference_mode
from .calibration import read_local_text, tokenize
from .losses import next_token_loss, ppl_of


EVAL_SEQ_LEN = 256      # tokens per evaluation window
EVAL_WINDOWS = 16       # windows evaluated (the first ones of the text)


def eval_info(windows: torch.Tensor, text: str | Path | None = None) -> dict:
    """What a perplexity was measured on: window length and count, tokens, the text."""
    return {"eval_text": None if text is None else str(text),
            "eval_seq_len": int(windows.shape[1]), "eval_windows": int(windows.shape[0]),
            "eval_tokens": int(windows.numel())}


def eval_windows(tokenizer, text_path: str | Path, seq_len: int,
                 max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (k, seq_len) of the text's tokens (the tail is dropped)."""
    path = Path(text_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"evaluation text not found: {str(path)!r}")
    ids = tokenize(tokenizer, read_local_text(path))
    k = ids.numel() // seq_len
    if max_windows is not None:
        k = min(k, max_windows)
    if k == 0:
        raise ValueError(f"{str(path)!r} has {ids.numel()} tokens, fewer than one window of "
                         f"{seq_len}; use a longer text or a smaller --seq-len")
    return ids[:k * seq_len].view(k, seq_len)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress=lambda it: it
               ) -> dict:
    """``exp`` of the mean next-token NLL over the windows, with tokens per second."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.time()
    with inference_mode(model):
        for ids in progress(list(windows.split(batch_size))):
            ids = ids.to(device)
            loss = next_token_loss(model(input_ids=ids).logits, ids, "sum")   # (B, T, V) logits
            nll += loss.item()
            count += ids[:, 1:].numel()
    seconds = time.time() - t0
    mean = nll / count
    return {"ppl": ppl_of(mean), "nll": mean, "seq_len": windows.shape[1],
            "tokens": windows.numel(), "windows": windows.shape[0], "seconds": seconds,
            "tokens_per_s": windows.numel() / max(seconds, 1e-9)}
