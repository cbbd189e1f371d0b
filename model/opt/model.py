"""OPT decoder-only language model (Zhang et al., 2022), with a pluggable attention softmax.

Pre-LayerNorm blocks, ReLU FFN, learned positions with OPT's offset of 2, a final LayerNorm and an LM
head tied to the token embeddings. Module names follow Hugging Face's OPTForCausalLM so that weights
map one-to-one and outlier hooks find `self_attn.out_proj`, `self_attn_layer_norm`, `fc2`, ...
Parallelism is chosen by the layer factory (model/layers.py), never by branches in this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import MultiHeadAttention
from model.config import ModelConfig
from model.layers import IGNORE_INDEX, LocalLayers
from model.taps import Tap

POSITION_OFFSET = 2  # OPT reserves the first two position rows (a fairseq legacy).


class LearnedPositions(nn.Module):
    def __init__(self, max_positions: int, dim: int, layers: LocalLayers) -> None:
        super().__init__()
        # A plain (replicated) embedding: positions are few and every TP rank needs all of them.
        self.weight = nn.Parameter(torch.empty(max_positions + POSITION_OFFSET, dim))
        nn.init.normal_(self.weight, mean=0.0, std=layers.init_std)

    def forward(self, attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        if attention_mask is None:
            positions = torch.arange(seq, device=self.weight.device).expand(batch, seq)
        else:  # as OPT: count only real tokens, so left padding does not shift positions
            positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).clamp_min(0).long()
        return F.embedding(positions + POSITION_OFFSET, self.weight)


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = MultiHeadAttention(
            cfg.hidden_size, cfg.num_heads, cfg.attention, seq_length=seq_length, dropout=cfg.attention_dropout,
            init_std=cfg.init_std, layers=layers, bias=cfg.attention_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = layers.column(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = layers.row(cfg.ffn_hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_residual, self.ffn_residual = Tap(), Tap()  # the residual sums (quantized by W8A8)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attn_residual(hidden + self.dropout(self.self_attn(self.self_attn_layer_norm(hidden), attn_mask)))
        return self.ffn_residual(hidden + self.dropout(self.fc2(torch.relu(self.fc1(self.final_layer_norm(hidden))))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.embed_tokens = layers.embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.embed_positions = LearnedPositions(cfg.max_position_embeddings, cfg.hidden_size, layers)
        if cfg.embedding_init_std is not None:  # e.g. Guo et al.'s N(0, 1), PyTorch's nn.Embedding default
            for weight in (self.embed_tokens.weight, self.embed_positions.weight):
                nn.init.normal_(weight, mean=0.0, std=cfg.embedding_init_std)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, seq_length, layers) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_sum = Tap()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq = input_ids.shape
        hidden = self.embed_sum(self.embed_tokens(input_ids) + self.embed_positions(attention_mask, batch, seq))
        key_mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        return self.final_layer_norm(hidden)


class OPTForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int | None = None, layers: LocalLayers | None = None) -> None:
        super().__init__()
        cfg.validate()
        seq_length = cfg.sequence_length(seq_length)
        self.config = cfg
        self.layers = layers or LocalLayers(cfg.init_std)
        self.decoder = OPTDecoder(cfg, seq_length, self.layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty_like(self.decoder.embed_tokens.weight))
            nn.init.normal_(self.lm_head, mean=0.0, std=cfg.init_std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, padded_vocab / tp]; with `labels`, the mean next-token loss instead.

        As in Hugging Face's causal LM, predictions are shifted inside the block (position t predicts
        label t+1) and padded positions (attention_mask == 0) or labels == -100 are ignored.
        """
        hidden = self.decoder(input_ids, attention_mask)
        if labels is None:
            return self.layers.lm_logits(hidden, self.lm_head_weight)
        losses, count = self.token_losses(hidden, labels, attention_mask)
        return losses.sum() / count.clamp_min(1)

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position losses [batch, seq - 1] of the shifted prediction, and the number that count.

        The last position predicts nothing in the block, so its logits are never computed."""
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        shifted = labels[:, 1:]
        logits = self.layers.lm_logits(hidden[:, :-1], self.lm_head_weight)
        return self.layers.token_losses(logits, shifted), (shifted != IGNORE_INDEX).sum()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.decoder.embed_tokens.weight), None)
            params.pop(id(self.decoder.embed_positions.weight), None)
        return sum(p.numel() for p in params.values())
