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
#: Which windows a capped evaluation takes: the first ones of the text, or that many spread
#: evenly over all of it (the first and the last among them). Measured on the demo model
#: (bench/README.md, "How far 16 windows carry"): the first 16 windows of WikiText-2 test
#: (its first article) gave each of six LLRC plans 0.16-0.24 more of SVD-LLM's gap to dense
#: than the whole test set did; over every sample of the text, the share measured on 16
#: spread windows varied about half as much as on 16 consecutive ones (sd 0.08-0.10
#: against 0.14-0.18), and so on 128 (0.02-0.04 against 0.04-0.09).
EVAL_SAMPLES = ("first", "spread")


def eval_info(windows: torch.Tensor, text: str | Path | None = None,
              sample: str | None = None) -> dict:
    """What a perplexity was measured on: window length and count, tokens, the text, and
    (where the caller knows it) which windows of the text (``EVAL_SAMPLES``)."""
    return {"eval_text": None if text is None else str(text),
            "eval_seq_len": int(windows.shape[1]), "eval_windows": int(windows.shape[0]),
            "eval_tokens": int(windows.numel()),
            **({"eval_sample": sample} if sample is not None else {})}


def eval_windows(tokenizer, text_path: str | Path, seq_len: int,
                 max_windows: int | None = None, sample: str = "first") -> torch.Tensor:
    """Non-overlapping windows (k, seq_len) of the text's tokens (the tail is dropped):
    the first ``max_windows`` of them, or (``sample="spread"``) that many at evenly spaced
    positions over the whole text. ``None`` takes them all."""
    if sample not in EVAL_SAMPLES:
        raise ValueError(f"evaluation sample must be one of {EVAL_SAMPLES}, got {sample!r}")
    path = Path(text_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"evaluation text not found: {str(path)!r}")
    ids = tokenize(tokenizer, read_local_text(path))
    total = ids.numel() // seq_len
    if total == 0:
        raise ValueError(f"{str(path)!r} has {ids.numel()} tokens, fewer than one window of "
                         f"{seq_len}; use a longer text or a smaller --seq-len")
    windows = ids[:total * seq_len].view(total, seq_len)
    k = total if max_windows is None else min(total, max_windows)
    if k < 1:
        raise ValueError(f"evaluate at least one window, got max_windows={max_windows}")
    if sample == "first" or k == total:
        return windows[:k]
    # distinct indices: consecutive linspace points are >= 1 apart when k <= total
    return windows[torch.linspace(0, total - 1, k).round().long()]


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


def window_evaluator(model, windows: torch.Tensor, batch_size: int = 8):
    """``evaluate(m) -> dict`` on token windows (k, L), for ``workflow.compress``: a causal
    LM's perplexity (``{"ppl"}``); an encoder's embedding fidelity (``{"fidelity"}``: the
    mean cosine between each window's mean-pooled last state and ``model``'s, embedded now,
    so pass the dense model). Compare scores an encoder on sentence lines instead
    (``Session.evaluate``); a compress run has only its evaluation windows."""
    from . import fidelity
    from .distill import has_lm_head
    if has_lm_head(model):
        return lambda m: {"ppl": perplexity(m, windows, batch_size)["ppl"]}
    reference = fidelity.window_embeddings(model, windows, batch_size)
    return lambda m: {"fidelity": fidelity.mean_cosine(
        reference, fidelity.window_embeddings(m, windows, batch_size))}
