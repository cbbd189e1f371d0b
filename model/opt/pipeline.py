"""OPT as DeepSpeed pipeline stages (LayerSpecs), built from the same blocks as model/opt/model.py.

Stages: tied token embedding | learned positions | OPTDecoderLayer x L | final LayerNorm | tied LM head.
The token embedding and the output projection are one TiedLayerSpec, so the first and last stages hold the
same (vocab-parallel under TP) weight and DeepSpeed all-reduces its gradient. Training examples are packed
(no padding), so no attention mask travels between stages.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from model.config import ModelConfig
from model.family import PipelineParts
from model.layers import IGNORE_INDEX, LocalLayers
from model.opt.model import LearnedPositions, OPTDecoderLayer

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


def pipeline_parts(cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> PipelineParts:
    specs: list[Any] = [TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, tied_weight_attr="embed_tokens.weight"),
                        LayerSpec(PositionStage, cfg, layers)]
    specs += [LayerSpec(PipelineDecoderLayer, cfg, seq_length, layers) for _ in range(cfg.num_layers)]
    specs += [LayerSpec(FinalNorm, cfg),
              TiedLayerSpec(TIED_KEY, TokenEmbedding, cfg, layers, forward_fn=lm_head,
                            tied_weight_attr="embed_tokens.weight")]
    return PipelineParts(specs, partial(_causal_loss, layers), PipelineDecoderLayer.__name__)


def canonical_name(name: str, cfg: ModelConfig) -> str:
    """PipelineModule parameter name ("3.fc1.weight") -> the single-process name ("decoder.layers.1.fc1.weight")."""
    if name.startswith(f"tied_modules.{TIED_KEY}."):
        return "decoder." + name.split(".", 2)[2]
    index, rest = name.split(".", 1)
    idx, first_layer, last_layer = int(index), 2, 2 + cfg.num_layers
    if idx == 1 or idx == last_layer:  # positions; the final LayerNorm
        return "decoder." + rest
    if first_layer <= idx < last_layer:
        return f"decoder.layers.{idx - first_layer}." + rest
    raise ValueError(f"unexpected pipeline parameter {name!r}")
