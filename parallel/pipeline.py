"""Pipeline parallelism: a model family as a DeepSpeed PipelineModule built from the same blocks.

OPT stages (LayerSpecs): tied token embedding | learned positions | OPTDecoderLayer x L | final LayerNorm |
tied LM head.
BERT stages: tied word embedding | positions + token types + LayerNorm | BertLayer x L | MLM transform
(dense, GELU, LayerNorm) | tied decoder | MLM bias.
The token embedding and the output projection are one TiedLayerSpec, so the first and last stages hold
the same (vocab-parallel under TP) weight and DeepSpeed all-reduces its gradient. Parameter names inside
the PipelineModule ("3.fc1.weight") map to the canonical single-process names
("decoder.layers.1.fc1.weight") with `canonical_name`, which sharding and consolidation use.
Training examples are packed (no padding), so no attention mask travels between stages.
"""

from __future__ import annotations

from functools import partial

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from model.bert import BertEmbeddings, BertLayer, BertPredictionHeadTransform
from model.config import ModelConfig
from model.layers import IGNORE_INDEX, LocalLayers
from model.opt import LearnedPositions, OPTDecoderLayer

TIED_KEY = "embed"


class TokenEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.layers = layers
        self.embed_tokens = layers.embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head: logits of positions 0..T-2 (the last position predicts nothing in the block)."""
    return embedding.layers.lm_logits(hidden[:, :-1], embedding.embed_tokens.weight)


class PositionStage(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.embed_positions = LearnedPositions(cfg.max_position_embeddings, cfg.hidden_size, layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.embed_positions(None, hidden.shape[0], hidden.shape[1])


class PipelineDecoderLayer(OPTDecoderLayer):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(hidden)


def _causal_loss(layers: LocalLayers, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[:, 1:]
    losses = layers.token_losses(logits, shifted)
    return losses.sum() / (shifted != IGNORE_INDEX).sum().clamp_min(1)


# ---------------------------------------------------------------- BERT

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


# ---------------------------------------------------------------- names and assembly

def canonical_name(name: str, cfg: ModelConfig) -> str:
    """PipelineModule parameter name -> the single-process model's name."""
    bert = cfg.family == "bert"
    if name.startswith(f"tied_modules.{TIED_KEY}."):
        return ("bert.embeddings." if bert else "decoder.") + name.split(".", 2)[2]
    index, rest = name.split(".", 1)
    idx, first_layer, last_layer = int(index), 2, 2 + cfg.num_layers
    if idx == 1:
        return ("bert.embeddings." if bert else "decoder.") + rest
    if first_layer <= idx < last_layer:
        return (f"bert.encoder.layer.{idx - 2}." if bert else f"decoder.layers.{idx - 2}.") + rest
    if idx == last_layer or (bert and idx == last_layer + 2):  # OPT's final norm; BERT's transform and bias
        return ("cls.predictions." if bert else "decoder.") + rest
    raise ValueError(f"unexpected pipeline parameter {name!r}")


def build_pipeline(cfg: ModelConfig, seq_length: int, layers: LocalLayers, *, pipeline: int, tensor: int,
                   data: int, partition_method: str, activation_checkpointing: bool) -> PipelineModule:
    if not cfg.tie_word_embeddings:
        raise ValueError("pipeline parallelism builds the tied output layer; set model.tie_word_embeddings=true")
    if cfg.family == "bert":
        layer_class = PipelineBertLayer
        specs = [TiedLayerSpec(TIED_KEY, WordEmbedding, cfg, layers, tied_weight_attr="word_embeddings.weight"),
                 LayerSpec(EmbeddingRest, cfg, layers)]
        specs += [LayerSpec(PipelineBertLayer, cfg, seq_length, layers) for _ in range(cfg.num_layers)]
        specs += [LayerSpec(MLMTransform, cfg, layers),
                  TiedLayerSpec(TIED_KEY, WordEmbedding, cfg, layers, forward_fn=mlm_decoder,
                                tied_weight_attr="word_embeddings.weight"),
                  LayerSpec(MLMBias, cfg, layers)]
        loss_fn = partial(_mlm_loss, layers)
    else:
        layer_class = PipelineDecoderLayer
        specs = [TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, tied_weight_attr="embed_tokens.weight"),
                 LayerSpec(PositionStage, cfg, layers)]
        specs += [LayerSpec(PipelineDecoderLayer, cfg, seq_length, layers) for _ in range(cfg.num_layers)]
        specs += [LayerSpec(FinalNorm, cfg),
                  TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, forward_fn=lm_head,
                                tied_weight_attr="embed_tokens.weight")]
        loss_fn = partial(_causal_loss, layers)
    method = f"type:{layer_class.__name__}" if partition_method == "layers" else partition_method
    topology = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    return PipelineModule(layers=specs, loss_fn=loss_fn, topology=topology, partition_method=method,
                          activation_checkpoint_interval=int(activation_checkpointing))
