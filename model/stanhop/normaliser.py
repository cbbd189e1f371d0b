"""The Hopfield layers' separation function (normaliser): any variant of the attention registry
(model/variants.py), with its settings from the `attention:` section and its learned per-head parameters
held by the Hopfield layer that uses it.

STanHop's own normaliser is alpha-entmax with a learnable alpha (the registry's `entmax`: alpha = 1 +
sigmoid(a), learned per head, entmax package's bisection); OutEffHop's study swaps in softmax, softmax1,
sparsemax, clipped softmax and clipped softmax1. Every variant runs through `RegistrySeparation`, i.e.
model.hopfield's eager path, fused-capable softmax/softmax1 included: its taps (scores, weights, context) are
what W8A8 evaluation quantizes, so all normalisers are quantized alike (the association matrices here are
[segments x segments] or [series x queries], small enough that a fused kernel would gain little).
"""

from __future__ import annotations

import torch
from torch import nn

from model import variants
from model.attention_config import AttentionConfig


class RegistrySeparation(nn.Module):
    """logits [B, H, S, N] -> weights with one registered variant; its per-head parameters ([H, 1, 1], e.g.
    entmax's alpha_logit, learnable_sink's sink_logit) are this module's parameters, learned with the layer."""

    def __init__(self, variant: str, keywords: dict[str, object], num_heads: int, settings: dict[str, object]) -> None:
        super().__init__()
        self.variant, self.keywords = variant, dict(keywords)
        spec = variants.get(variant)
        self.head_params = nn.ParameterDict({
            head.name: nn.Parameter(torch.full((num_heads, 1, 1), float(head.init(settings)))) for head in spec.head_params})

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        params = {name: p.to(logits.dtype) for name, p in self.head_params.items()}
        return variants.get(self.variant).probabilities(logits, **self.keywords, **params)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, keywords={self.keywords}"


def make_separation(attention: AttentionConfig, num_heads: int, num_stored: int) -> RegistrySeparation:
    """A fresh separation for one Hopfield layer with `num_heads` heads over `num_stored` stored patterns
    (the length clipped variants scale gamma by when attention.alpha is set)."""
    keywords = variants.keywords_of(attention, num_stored)
    return RegistrySeparation(attention.variant, keywords, num_heads, variants.settings_of(attention))
