"""Tensor-parallel layer factory: megatron-core's layers behind the interface of model/layers.py.

OPT's q/k/v and fc1 are column-parallel (each rank holds num_heads / tp heads and ffn / tp units),
out_proj and fc2 row-parallel (their all-reduce restores the full hidden state), the token
embedding vocab-parallel, and the tied LM head computes this rank's vocabulary slice of the logits,
fed to megatron-core's vocab-parallel cross entropy.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy)
from torch import nn

from model.layers import IGNORE_INDEX, LocalLayers
from parallel.random import TRACKER


class _Column(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]  # megatron returns (output, bias-or-None)


class _Row(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def _mark_split(param: torch.Tensor, dim: int) -> None:
    # megatron-core sets these only when it initialises weights itself (perform_initialization=True);
    # set them always, so sharding, consolidation and grad-norm see every split parameter.
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def _init_zero(weight: torch.Tensor) -> torch.Tensor:
    # Parameters are filled afterwards from one full, layout-independent state dict (parallel/sharding.py).
    return nn.init.zeros_(weight)


class TensorParallelLayers(LocalLayers):
    def __init__(self, init_std: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(init_std)
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                          perform_initialization=False, params_dtype=params_dtype,
                                          gradient_accumulation_fusion=False)

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        layer = _Column(in_features, out_features, config=self.config, init_method=_init_zero, bias=bias,
                        gather_output=False, skip_bias_add=False)
        for param in layer.parameters():  # weight [out/tp, in] and bias [out/tp]
            _mark_split(param, 0)
        return layer

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        layer = _Row(in_features, out_features, config=self.config, init_method=_init_zero, bias=bias,
                     input_is_parallel=True, skip_bias_add=False)
        _mark_split(layer.weight, 1)  # [out, in/tp]; the bias is added after the all-reduce: replicated
        return layer

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        layer = VocabParallelEmbedding(num_embeddings, dim, init_method=_init_zero, config=self.config)
        _mark_split(layer.weight, 0)
        return layer

    def vocab_bias(self, num_embeddings: int) -> nn.Parameter:
        bias = super().vocab_bias(num_embeddings)  # [vocab / tp]: this rank's slice, as its logits
        _mark_split(bias, 0)
        return bias

    def head_parallel(self, param: nn.Parameter) -> nn.Parameter:
        """Mark a per-head parameter (gate, sink logit) as split over TP ranks along dim 0."""
        _mark_split(param, 0)
        return param

    def into_parallel_region(self, x: torch.Tensor) -> torch.Tensor:
        # Identity forward, all-reduce backward: each rank's heads contribute part of d(x).
        return copy_to_tensor_model_parallel_region(x)

    def lm_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Identity forward, all-reduce backward: every rank's vocab slice contributes to d(hidden).
        return F.linear(copy_to_tensor_model_parallel_region(hidden), weight)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ignored = labels == IGNORE_INDEX
        losses = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(ignored, 0))
        return losses.masked_fill(ignored, 0.0)

    rng_tracker = TRACKER

    @contextlib.contextmanager
    def model_parallel_rng(self) -> Iterator[None]:
        with TRACKER.fork():
            yield
