"""BERT encoder with a masked-language-model head (Devlin et al., 2019), with a pluggable attention softmax.

Post-LayerNorm blocks, exact (erf) GELU, learned absolute positions, token-type embeddings, an MLM head
(dense + GELU + LayerNorm, then the decoder tied to the word embeddings plus its own bias). Attention is
the same `MultiHeadAttention` as OPT's (every variant and backend), run bidirectionally with a key
padding mask. Module names follow Hugging Face's `BertForMaskedLM` except inside attention, where the
projections keep this project's names (`attention.self.q_proj` = HF `attention.self.query`,
`attention.self.out_proj` = HF `attention.output.dense`; `launcher/hf_checkpoint.py` maps them), so the
outlier hooks name `bert.encoder.layer.N.output.dense` / `output.LayerNorm` as the papers do.
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


def _replicated_embedding(num: int, dim: int, std: float) -> nn.Embedding:
    # Positions and token types are few and every TP rank needs all of them: plain, replicated.
    emb = nn.Embedding(num, dim)
    nn.init.normal_(emb.weight, mean=0.0, std=std)
    return emb


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers, with_words: bool = True) -> None:
        super().__init__()
        if with_words:  # a pipeline keeps the word embedding in its tied first stage instead
            self.word_embeddings = layers.embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = _replicated_embedding(cfg.max_position_embeddings, cfg.hidden_size, cfg.init_std)
        self.token_type_embeddings = _replicated_embedding(cfg.type_vocab_size, cfg.hidden_size, cfg.init_std)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.embed_sum = Tap()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(self.word_embeddings(input_ids), token_type_ids)

    def finish(self, words: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Word embeddings [batch, seq, dim] + token types (0 when not given) + positions, LayerNorm, dropout
        (summed in Hugging Face's order, so the fp32 result is the same to the last bit)."""
        types = (self.token_type_embeddings(token_type_ids) if token_type_ids is not None
                 else self.token_type_embeddings.weight[0])
        positions = self.position_embeddings.weight[:words.shape[1]]
        return self.dropout(self.LayerNorm(self.embed_sum(words + types + positions)))


class BertAttentionOutput(nn.Module):
    """Residual + post-LayerNorm after self-attention (HF's attention.output, whose dense is out_proj)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual = Tap()  # the residual sum, post-LN's input (quantized by W8A8)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.residual(self.dropout(attended) + residual))


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.self = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.attention, seq_length=seq_length,
                                       dropout=cfg.attention_dropout, init_std=cfg.init_std, layers=layers,
                                       causal=False)
        self.output = BertAttentionOutput(cfg)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, attn_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.dense = layers.column(cfg.hidden_size, cfg.ffn_hidden_size)
        self.activation = Tap(fused_with="dense")  # GELU(dense(x)), what output.dense reads (quantized by W8A8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(F.gelu(self.dense(hidden)))


class BertOutput(nn.Module):
    """FFN output dense, residual, post-LayerNorm: the modules the outlier protocol hooks for BERT."""

    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.dense = layers.row(cfg.ffn_hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual = Tap()  # the residual sum, post-LN's input (quantized by W8A8)

    def forward(self, intermediate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.residual(self.dropout(self.dense(intermediate)) + residual))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, seq_length, layers)
        self.intermediate = BertIntermediate(cfg, layers)
        self.output = BertOutput(cfg, layers)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attention(hidden, attn_mask)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, seq_length, layers) for _ in range(cfg.num_layers))

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, attn_mask)
        return hidden


class BertModel(nn.Module):
    """Embeddings + encoder (no pooler: MLM pretraining does not use it, as HF's BertForMaskedLM)."""

    def __init__(self, cfg: ModelConfig, seq_length: int, layers: LocalLayers) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg, layers)
        self.encoder = BertEncoder(cfg, seq_length, layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        key_mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        return self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.dense = layers.replicated(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    """Transform, then logits against the (tied) word embeddings plus a per-token bias."""

    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg, layers)
        self.bias = layers.vocab_bias(cfg.padded_vocab_size)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, layers)


def mlm_logits(layers: LocalLayers, predictions: BertLMPredictionHead, hidden: torch.Tensor,
               decoder_weight: torch.Tensor) -> torch.Tensor:
    """Logits [..., padded_vocab / tp] of the MLM head for encoder outputs [..., hidden]."""
    return layers.lm_logits(predictions.transform(hidden), decoder_weight) + predictions.bias


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_length: int | None = None, layers: LocalLayers | None = None) -> None:
        super().__init__()
        cfg.validate()
        seq_length = cfg.sequence_length(seq_length)
        self.config = cfg
        self.layers = layers or LocalLayers(cfg.init_std)
        self.bert = BertModel(cfg, seq_length, self.layers)
        self.cls = BertOnlyMLMHead(cfg, self.layers)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, padded_vocab / tp]; with `labels`, the mean loss over the labelled (masked)
        positions instead (labels == -100 and padded positions are ignored; nothing is shifted)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return mlm_logits(self.layers, self.cls.predictions, hidden, self.lm_head_weight)
        losses, count = self.token_losses(hidden, labels, attention_mask)
        return losses.sum() / count.clamp_min(1)

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses of the labelled positions only [n] (the head runs on those ~15% alone), and n."""
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        selected = labels != IGNORE_INDEX
        logits = mlm_logits(self.layers, self.cls.predictions, hidden[selected], self.lm_head_weight)
        return self.layers.token_losses(logits, labels[selected]), selected.sum()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            embeddings = self.bert.embeddings
            for module in (embeddings.word_embeddings, embeddings.position_embeddings,
                           embeddings.token_type_embeddings):
                params.pop(id(module.weight), None)
        return sum(p.numel() for p in params.values())
