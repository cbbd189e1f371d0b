"""Named points of a model's forward pass where evaluation may intercept an activation.

A `Tap` computes nothing (an identity without parameters, so state dicts do not change). The families put
one on every activation the W8A8 protocol quantizes that is not already some module's output: residual
sums, the embedding sum, and, inside attention's eager path, scores, probabilities and context. Quantized
evaluation (outliers/ptq.py) swaps Taps for fake-quantizers instead of re-implementing forward passes.
"""

from __future__ import annotations

from torch import nn


class Tap(nn.Identity):
    """An identity marking an activation that quantized evaluation may replace by a quantizer.

    fused_with: the name of a sibling Linear whose output this tap sees after an elementwise activation
    (BERT's intermediate: GELU(dense(x))). Quantized evaluation then quantizes only here, as a fused
    kernel would hand the activated output on, not the Linear's own output.
    """

    def __init__(self, fused_with: str | None = None) -> None:
        super().__init__()
        self.fused_with = fused_with

    def extra_repr(self) -> str:
        return f"fused_with={self.fused_with!r}" if self.fused_with else ""
