"""Eager softmax variants: the numerically stable reference every fused backend is checked against.

All functions take logits whose masked entries are already -inf and normalise over the last dim; a row
that may attend to no key gets zeros. The OutEffHop variants are defined once, in the self-contained file
every Hugging Face export ships (model/hf_remote/outeffhop_attention.py, which imports only torch), so
the training code and the exports compute the same probabilities. `probabilities` dispatches through the
variant registry (model/variants.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model.hf_remote.outeffhop_attention import clip_probabilities, softmax, softmax1, softmax_with_sink


def softmax_n(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Generalised softmax_n: n * exp(0) in the denominator; softmax_n(x, 1) == softmax1(x)."""
    if n <= 0:
        raise ValueError(f"softmax_n needs n > 0, got n={n}")
    return softmax_with_sink(logits, float(torch.log(torch.tensor(float(n)))))


def _on_unmasked_rows(logits: torch.Tensor, normaliser: Any) -> torch.Tensor:
    """`normaliser` on every row that may attend somewhere; zeros on fully masked rows (the entmax package's
    functions would divide by an empty support there)."""
    fully_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = normaliser(logits.masked_fill(fully_masked, 0.0))
    return probs.masked_fill(fully_masked, 0.0)


def sparsemax(logits: torch.Tensor) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, 2016), the entmax package's: Euclidean projection of the logits onto
    the simplex; gives exact zeros to weak keys. -inf entries get 0, a fully masked row zeros."""
    import entmax

    return _on_unmasked_rows(logits, lambda x: entmax.sparsemax(x, dim=-1))


DEFAULT_ENTMAX_ALPHA = 1.5


def entmax_alpha(alpha_logit: torch.Tensor | float) -> torch.Tensor:
    """alpha = 1 + sigmoid(alpha_logit) in (1, 2): the adaptively sparse transformer's parameterisation
    (Correia et al., 2019), which keeps alpha between softmax (1) and sparsemax (2)."""
    return 1.0 + torch.sigmoid(torch.as_tensor(alpha_logit))


def alpha_logit(alpha: float) -> float:
    """The logit whose `entmax_alpha` is `alpha` (1 < alpha < 2)."""
    return math.log((alpha - 1.0) / (2.0 - alpha))


def entmax(logits: torch.Tensor, alpha_logit: torch.Tensor | float | None = None) -> torch.Tensor:
    """alpha-entmax (Peters et al., 2019) by the entmax package's bisection, differentiable in the logits and
    in alpha = 1 + sigmoid(alpha_logit) (broadcastable to the logits without their last dim, e.g. one per
    head as [heads, 1, 1]; None: alpha = 1.5). -inf entries get 0, a fully masked row zeros."""
    import entmax as entmax_package

    if alpha_logit is None:
        alpha = torch.tensor(DEFAULT_ENTMAX_ALPHA, dtype=logits.dtype, device=logits.device)
    else:
        alpha = entmax_alpha(alpha_logit).to(device=logits.device, dtype=logits.dtype)
    alpha = alpha.expand(*logits.shape[:-1], 1) if alpha.dim() else alpha
    return _on_unmasked_rows(logits, lambda x: entmax_package.entmax_bisect(x, alpha, dim=-1))


__all__ = ["softmax", "softmax1", "softmax_with_sink", "softmax_n", "clip_probabilities", "sparsemax", "entmax",
           "entmax_alpha", "alpha_logit"]
