"""Losses shared by evaluation and training: next-token cross-entropy and hidden-state
distances. Tensors in, a scalar out."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits (B, T, V)`` predicting ``ids (B, T)`` shifted by one."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1).to(logits.device), reduction=reduction)


def nmse(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised MSE ``||h - t||^2 / ||t||^2`` (scale-free across layers and models)."""
    return (h.float() - target.float()).pow(2).sum() / target.float().pow(2).sum().clamp_min(1e-12)


def mse(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (h.float() - target.float()).pow(2).mean()


def ppl_of(mean_nll: float) -> float:
    """Perplexity of a mean next-token NLL (``inf`` past float range)."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
