"""Pipeline parallelism: the OPT model as a DeepSpeed PipelineModule built from the same blocks.

Stage list (LayerSpecs): tied token embedding | learned positions | OPTDecoderLayer x L | final
LayerNorm | tied LM head. The token embedding and the LM head are one TiedLayerSpec, so the first and
last stages hold the same (vocab-parallel under TP) weight and DeepSpeed all-reduces its gradient.
Parameter names inside the PipelineModule ("3.fc1.weight") map to the canonical single-process names
("decoder.layers.1.fc1.weight") with `canonical_name`, which sharding and consolidation use.
"""

from __future__ import annotations

from functools import partial

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

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
        return super().forward(hidden)  # training blocks are packed: no padding mask between stages


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(hidden)


def _loss(layers: LocalLayers, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[:, 1:]
    losses = layers.token_losses(logits, shifted)
    return losses.sum() / (shifted != IGNORE_INDEX).sum().clamp_min(1)


def canonical_name(name: str, num_layers: int) -> str:
    """PipelineModule parameter name -> the single-process model's name."""
    if name.startswith(f"tied_modules.{TIED_KEY}."):
        return "decoder." + name.split(".", 2)[2]
    index, rest = name.split(".", 1)
    idx = int(index)
    if idx == 1:
        return f"decoder.{rest}"
    if 2 <= idx < 2 + num_layers:
        return f"decoder.layers.{idx - 2}.{rest}"
    if idx == 2 + num_layers:
        return f"decoder.{rest}"
    raise ValueError(f"unexpected pipeline parameter {name!r}")


def build_pipeline(cfg: ModelConfig, seq_length: int, layers: LocalLayers, *, pipeline: int, tensor: int,
                   data: int, partition_method: str, activation_checkpointing: bool) -> PipelineModule:
    if not cfg.tie_word_embeddings:
        raise ValueError("pipeline parallelism builds the tied OPT head; set model.tie_word_embeddings=true")
    specs = [TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, tied_weight_attr="embed_tokens.weight"),
             LayerSpec(PositionStage, cfg, layers)]
    specs += [LayerSpec(PipelineDecoderLayer, cfg, seq_length, layers) for _ in range(cfg.num_layers)]
    specs += [LayerSpec(FinalNorm, cfg),
              TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, forward_fn=lm_head,
                            tied_weight_attr="embed_tokens.weight")]
    method = "type:PipelineDecoderLayer" if partition_method == "type:OPTDecoderLayer" else partition_method
    topology = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    return PipelineModule(layers=specs, loss_fn=partial(_loss, layers), topology=topology,
                          partition_method=method, activation_checkpoint_interval=int(activation_checkpointing))
