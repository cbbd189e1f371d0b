"""Layer factories: the one place where a model's Linear/Embedding layers and loss are chosen.

`model/opt.py` is written against this interface; single-process training uses `LocalLayers`
(plain torch modules), and tensor parallelism substitutes megatron-core's Column/RowParallelLinear,
VocabParallelEmbedding and vocab-parallel cross entropy through a factory with the same methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LocalLayers:
    """Single-process layers. `column` outputs are split across TP ranks and `row` inputs are, which
    for one process simply means full-width Linear layers."""

    tp_size = 1
    tp_rank = 0

    def __init__(self, init_std: float) -> None:
        self.init_std = init_std

    def _linear(self, in_features: int, out_features: int, bias: bool) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, mean=0.0, std=self.init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Embedding:
        emb = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(emb.weight, mean=0.0, std=self.init_std)
        return emb

    def lm_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy ([batch, seq]); ignored labels give 0."""
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
