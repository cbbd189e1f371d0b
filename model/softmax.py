"""Eager softmax variants: the numerically stable reference every fused backend is checked against.

All functions take logits whose masked entries are already -inf and normalise over the last dim.
"""

from __future__ import annotations

import torch


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Vanilla softmax; a fully masked row gives zeros instead of NaN."""
    row_max = logits.amax(dim=-1, keepdim=True)
    fully_masked = torch.isneginf(row_max)
    shifted = logits - torch.where(fully_masked, torch.zeros_like(row_max), row_max)
    exp = torch.exp(shifted)
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(fully_masked, torch.ones_like(denom), denom)


def softmax_with_sink(logits: torch.Tensor, sink_logit: torch.Tensor | float = 0.0) -> torch.Tensor:
    """exp(x_i) / (exp(b) + sum_j exp(x_j)): a softmax over the row plus one implicit "no-op" logit b.

    b = 0 is softmax1 (OutEffHop); a learnable per-head b is the "learnable sink". Stable form with
    m = max(max_j x_j, b): exp(x_i - m) / (sum_j exp(x_j - m) + exp(b - m)). A fully masked row gives zeros.
    """
    sink = torch.as_tensor(sink_logit, dtype=logits.dtype, device=logits.device)
    row_max = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
    exp = torch.exp(logits - row_max)
    return exp / (exp.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max))


def softmax1(logits: torch.Tensor) -> torch.Tensor:
    """softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)) (OutEffHop's separation function)."""
    return softmax_with_sink(logits, 0.0)


def softmax_n(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Generalised softmax_n: n * exp(0) in the denominator; softmax_n(x, 1) == softmax1(x)."""
    if n <= 0:
        raise ValueError(f"softmax_n needs n > 0, got n={n}")
    return softmax_with_sink(logits, float(torch.log(torch.tensor(float(n)))))


def clip_probabilities(probs: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """Clipped softmax stretch-and-clip: clip((zeta - gamma) * p + gamma, 0, 1) (Bondarenko et al., 2023)."""
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def probabilities(logits: torch.Tensor, variant: str, *, sink_logit: torch.Tensor | None = None,
                  gamma: float = -0.025, zeta: float = 1.0) -> torch.Tensor:
    """Attention probabilities for a named variant (see model.config.SOFTMAX_VARIANTS)."""
    if variant == "softmax":
        return softmax(logits)
    if variant == "softmax1":
        return softmax1(logits)
    if variant == "clipped_softmax":
        return clip_probabilities(softmax(logits), gamma, zeta)
    if variant == "clipped_softmax1":
        return clip_probabilities(softmax1(logits), gamma, zeta)
    if variant == "learnable_sink":
        if sink_logit is None:
            raise ValueError("variant 'learnable_sink' needs sink_logit (one logit per head)")
        return softmax_with_sink(logits, sink_logit)
    raise ValueError(f"unknown softmax variant {variant!r}")
