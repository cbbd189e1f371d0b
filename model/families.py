"""The model families this system pretrains, and what the launcher, parallel engine and evaluation need
to know about each: how to build the model, and how a training example is laid out.

Examples travel through the data pipeline, batching, data-parallel sharding and evaluation as single
tensors so every family shares that plumbing:
  - causal ("opt"): a block of token ids [seq]; the labels are the ids themselves (shifted in the model);
  - mlm ("bert"): [2, seq] = (masked input ids, labels with -100 where nothing is predicted), made by
    data_pipeline/mlm.py.
`split_batch` turns a stacked batch into the (input_ids, labels) the model's forward takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import IGNORE_INDEX, LocalLayers


@dataclass(frozen=True)
class ModelFamily:
    name: str
    objective: str  # "causal" or "mlm": which examples the data pipeline makes
    layer_class: str  # the repeated block's class name (pipeline partition method "type:<layer_class>")
    _build: Callable[..., nn.Module]

    def build(self, cfg: ModelConfig, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        return self._build(cfg, seq_length=seq_length, layers=layers)

    def split_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A stacked batch of examples -> (input_ids [B, T], labels [B, T])."""
        if self.objective == "mlm":
            if batch.dim() != 3 or batch.shape[1] != 2:
                raise ValueError(f"MLM batches are [batch, 2, seq] (inputs, labels); got {tuple(batch.shape)}")
            return batch[:, 0], batch[:, 1]
        return batch, batch

    def num_targets(self, labels: torch.Tensor) -> int:
        """How many predictions a batch's loss averages over (its weight in a token-weighted mean)."""
        if self.objective == "mlm":
            return int((labels != IGNORE_INDEX).sum())
        return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _build_opt(cfg: ModelConfig, **kwargs: object) -> nn.Module:
    from model.opt import OPTForCausalLM

    return OPTForCausalLM(cfg, **kwargs)  # type: ignore[arg-type]


def _build_bert(cfg: ModelConfig, **kwargs: object) -> nn.Module:
    from model.bert import BertForMaskedLM

    return BertForMaskedLM(cfg, **kwargs)  # type: ignore[arg-type]


FAMILIES = {
    "opt": ModelFamily("opt", "causal", "OPTDecoderLayer", _build_opt),
    "bert": ModelFamily("bert", "mlm", "BertLayer", _build_bert),
}


def family_of(cfg: ModelConfig) -> ModelFamily:
    return FAMILIES[cfg.family]


def build_model(cfg: ModelConfig, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
    """The single-process (or, with a TP `layers` factory, tensor-parallel) model of `cfg.family`."""
    return family_of(cfg).build(cfg, seq_length=seq_length, layers=layers)
