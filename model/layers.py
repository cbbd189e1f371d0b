"""Layer factories: the one place where a model's Linear/Embedding layers and loss are chosen.

`model/opt.py` is written against this interface; single-process training uses `LocalLayers`
(plain torch modules), and tensor parallelism substitutes megatron-core's Column/RowParallelLinear,
VocabParallelEmbedding and vocab-parallel cross entropy through a factory with the same methods.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LocalLayers:
    """Single-process layers. `column` outputs are split across TP ranks and `row` inputs are, which
    for one process simply means full-width Linear layers."""

    tp_size = 1
    tp_rank = 0
    rng_tracker = None  # the TP dropout streams that recompute must rewind (parallel/random.py's under TP)

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

    def replicated(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        """A Linear every TP rank holds whole (e.g. BERT's MLM transform, which reads the full hidden state)."""
        return self._linear(in_features, out_features, bias)

    def vocab_bias(self, num_embeddings: int) -> nn.Parameter:
        """Output bias over the (padded) vocabulary, split like the vocab-parallel logits under TP."""
        return nn.Parameter(torch.zeros(num_embeddings // self.tp_size))

    def embedding(self, num_embeddings: int, dim: int) -> nn.Embedding:
        emb = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(emb.weight, mean=0.0, std=self.init_std)
        return emb

    def head_parallel(self, param: nn.Parameter) -> nn.Parameter:
        """Per-head parameters (gate, sink logit) are split over TP ranks; nothing to mark in one process."""
        return param

    def into_parallel_region(self, x: torch.Tensor) -> torch.Tensor:
        """Mark a replicated activation that this rank's heads read only in part (the gate's input)."""
        return x

    @contextlib.contextmanager
    def model_parallel_rng(self) -> Iterator[None]:
        """RNG for dropout on activations that are split over TP ranks; the default stream in one process."""
        yield

    def lm_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy ([batch, seq]); ignored labels give 0."""
        # Flattened rows keep log-softmax on the contiguous vocab dim (a [B, V, T] view is ~2x slower on CPU).
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none")
        return flat.view(labels.shape)
