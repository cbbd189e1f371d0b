"""The Hopfield layers' separation function (normaliser), one per STanHop variant.

softmax and softmax1 are passed to model.hopfield by name (they run through model.attention's fused
backends); entmax and sparsemax come from the `entmax` package (Peters et al.'s reference implementation),
the clipped variants from model.softmax. Each Hopfield layer gets its own instance: entmax's alpha is a
parameter of the layer, as in STanHop.
"""

from __future__ import annotations

import torch
from entmax import entmax_bisect, sparsemax
from torch import nn

from model.hopfield import SeparationSpec
from model.softmax import clip_probabilities, softmax, softmax1

from model.stanhop.config import StanhopAttentionConfig


class LearnableAlphaEntmax(nn.Module):
    """alpha-entmax with a learnable alpha = 1 + sigmoid(a) in (1, 2) (STanHop's EntmaxAlpha).

    a starts at 0 (alpha = 1.5, entmax15) rather than STanHop's random draw, so runs differ only by the seed's
    other draws. The bisection and its gradient in alpha are the entmax package's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pre_alpha = nn.Parameter(torch.zeros(1))

    @property
    def alpha(self) -> torch.Tensor:
        return 1.0 + torch.sigmoid(self.pre_alpha)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return entmax_bisect(logits, self.alpha.to(logits.dtype), dim=-1)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4f}"


class Sparsemax(nn.Module):
    """Sparsemax over the last dim (entmax package)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return sparsemax(logits, dim=-1)


class ClippedSoftmax(nn.Module):
    """clip((zeta - gamma) * p + gamma, 0, 1) of softmax or softmax1 probabilities (Bondarenko et al., 2023)."""

    def __init__(self, gamma: float, zeta: float, base: str) -> None:
        super().__init__()
        self.gamma, self.zeta, self.base = gamma, zeta, base

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        probs = softmax1(logits) if self.base == "softmax1" else softmax(logits)
        return clip_probabilities(probs, self.gamma, self.zeta)

    def extra_repr(self) -> str:
        return f"base={self.base}, gamma={self.gamma}, zeta={self.zeta}"


def make_separation(attention: StanhopAttentionConfig) -> SeparationSpec:
    """A fresh separation for one Hopfield layer: a name model.hopfield knows, or a module (own parameters)."""
    variant = attention.variant
    if variant in ("softmax", "softmax1"):
        return variant
    if variant == "entmax":
        return LearnableAlphaEntmax()
    if variant == "sparsemax":
        return Sparsemax()
    if variant in ("clipped_softmax", "clipped_softmax1"):
        return ClippedSoftmax(attention.gamma, attention.zeta, base=variant.removeprefix("clipped_"))
    raise ValueError(f"attention.variant: unknown STanHop normaliser {variant!r}")
