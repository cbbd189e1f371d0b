"""BERT as DeepSpeed pipeline stages (LayerSpecs), built from the same blocks as model/bert/model.py.

Stages: tied word embedding | positions + token types + LayerNorm | BertLayer x L | MLM transform (dense,
GELU, LayerNorm) | tied decoder | MLM bias. The word embedding and the decoder are one TiedLayerSpec (the first
and last stages hold the same weight; DeepSpeed all-reduces its gradient). Examples are packed, no mask.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from model.bert.model import BertEmbeddings, BertLayer, BertPredictionHeadTransform
from model.config import ModelConfig
from model.family import PipelineParts
from model.layers import IGNORE_INDEX, LocalLayers

TIED_KEY = "embed"


class WordEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.layers = layers
        self.word_embeddings = layers.embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class EmbeddingRest(BertEmbeddings):
    """Positions, token types (all 0 in packed pretraining), LayerNorm and dropout on the word embeddings;
    the word embedding itself lives in the tied first stage."""

    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__(cfg, layers, with_words=False)

    def forward(self, words: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.finish(words)


class PipelineBertLayer(BertLayer):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)


class MLMTransform(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg, layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden)


def mlm_decoder(embedding: WordEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied MLM decoder over every position (a pipeline stage cannot see which ones are labelled)."""
    return embedding.layers.lm_logits(hidden, embedding.word_embeddings.weight)


class MLMBias(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.bias = layers.vocab_bias(cfg.padded_vocab_size)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


def _mlm_loss(layers: LocalLayers, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return layers.token_losses(logits, labels).sum() / (labels != IGNORE_INDEX).sum().clamp_min(1)


def pipeline_parts(cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> PipelineParts:
    specs: list[Any] = [TiedLayerSpec(TIED_KEY, WordEmbedding, cfg, layers, tied_weight_attr="word_embeddings.weight"),
                        LayerSpec(EmbeddingRest, cfg, layers)]
    specs += [LayerSpec(PipelineBertLayer, cfg, seq_length, layers) for _ in range(cfg.num_layers)]
    specs += [LayerSpec(MLMTransform, cfg, layers),
              TiedLayerSpec(TIED_KEY, WordEmbedding, cfg, layers, forward_fn=mlm_decoder,
                            tied_weight_attr="word_embeddings.weight"),
              LayerSpec(MLMBias, cfg, layers)]
    return PipelineParts(specs, partial(_mlm_loss, layers), PipelineBertLayer.__name__)


def canonical_name(name: str, cfg: ModelConfig) -> str:
    """PipelineModule parameter name -> the single-process name (bert.encoder.layer.N..., cls.predictions...)."""
    if name.startswith(f"tied_modules.{TIED_KEY}."):
        return "bert.embeddings." + name.split(".", 2)[2]
    index, rest = name.split(".", 1)
    idx, first_layer, last_layer = int(index), 2, 2 + cfg.num_layers
    if idx == 1:
        return "bert.embeddings." + rest
    if first_layer <= idx < last_layer:
        return f"bert.encoder.layer.{idx - first_layer}." + rest
    if idx in (last_layer, last_layer + 2):  # the MLM transform and the output bias
        return "cls.predictions." + rest
    raise ValueError(f"unexpected pipeline parameter {name!r}")
