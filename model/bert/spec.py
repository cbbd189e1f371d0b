"""The BERT family's spec: an encoder with a masked-LM head, trained on [CLS] ... [SEP] masked examples."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from model.bert.data_config import BertDataConfig
from model.bert.hf import BertAdapter
from model.bert.objective import MASKED_LM
from model.family import Batch, Metric, StagesModule
from model.layers import IGNORE_INDEX, LocalLayers
from model.text_spec import TextFamilySpec

# Kind of hooked activation -> name relative to bert.encoder.layer.{j}; ":input" marks a module's input.
INPUT_SUFFIX = ":input"
LAYER_MODULES: dict[str, str] = {
    "ffn_out": "output.dense",
    "ffn_residual": "output.LayerNorm" + INPUT_SUFFIX,  # dense output + residual, before the LayerNorm
    "layer_out": "output.LayerNorm",  # post-LN: the LayerNorm's output is the layer's output
}
LAYER_PREFIX = "bert.encoder.layer."


class BertSpec(TextFamilySpec):
    block_types = ("BertLayer",)
    name = "bert"
    # Examples are [2, T] = (masked input ids, labels with -100 where nothing is predicted): model/bert/objective.py
    objective = MASKED_LM
    data_config_class = BertDataConfig  # the text data section plus the masking settings
    pipeline_stages = StagesModule("model.bert.pipeline")
    metrics = (Metric("ppl", "ppl", summary_label="MLM ppl", description="MLM perplexities"),)
    ptq_weight_range = "minmax"  # the BERT recipe
    ffn_activation_terms = 2  # GELU input and output
    embedding_norm = True
    hf = BertAdapter()

    def ptq_fp32_modules(self, model: nn.Module) -> set[str]:
        return super().ptq_fp32_modules(model) | {"cls"}  # the whole MLM head stays fp32, like OPT's LM head

    def build(self, cfg: Any, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        from model.bert.model import BertForMaskedLM

        return BertForMaskedLM(cfg, seq_length=seq_length, layers=layers)

    def validate_model(self, cfg: Any) -> None:
        if not cfg.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings", cfg.tie_word_embeddings,
                              "must be true for BERT (its MLM decoder is the word embedding matrix)")

    def validate_run(self, cfg: Any) -> None:
        super().validate_run(cfg)
        if cfg.data.bos:
            raise ConfigError("data.bos", cfg.data.bos, f"is for causal LMs (model.family=opt); {self.name}'s "
                              "examples already start with [CLS], a fixed first token")

    def collate(self, examples: list[Any]) -> Batch:
        batch = torch.stack(examples)
        if batch.dim() != 3 or batch.shape[1] != 2:
            raise ValueError(f"MLM batches are [batch, 2, seq] (inputs, labels); got {tuple(batch.shape)}")
        return Batch(batch[:, 0], batch[:, 1])

    def num_targets(self, batch: Batch) -> int:
        return int((batch.labels != IGNORE_INDEX).sum())  # the masked positions

    # The protocol for BERT (post-LN), per layer: the FFN output dense, the output LayerNorm's input (dense
    # output + residual: where BERT's outliers live) and that LayerNorm's output (the layer's output).
    def outlier_modules(self, model: nn.Module) -> dict[str, str]:
        return {f"{LAYER_PREFIX}{j}.{suffix}": kind for j in range(len(model.bert.encoder.layer))
                for kind, suffix in LAYER_MODULES.items()}

    def embedding_params(self, cfg: Any, tp: int = 1) -> tuple[int, int]:
        """Words vocab-parallel; positions, token types, LayerNorms and the MLM transform replicated; the
        output bias split like the logits; the tied decoder is the word embedding's copy on the last stage."""
        h, vocab = cfg.hidden_size, cfg.padded_vocab_size
        words = vocab * h // tp
        first = words + cfg.max_position_embeddings * h + cfg.type_vocab_size * h + 2 * h
        return first, h * h + h + 2 * h + vocab // tp + words

    def head_activations(self, cfg: Any, tokens: int, act_bytes: int, data_cfg: Any = None) -> tuple[float, int]:
        """The MLM head runs on the ~data.mlm_probability selected tokens (gathered hidden, dense out, GELU out,
        LN out)."""
        n = math.ceil(_mlm_probability(data_cfg) * tokens)
        return 4 * n * cfg.hidden_size * act_bytes, n

    def residual_streams(self, model: nn.Module) -> list[str]:
        return [f"{LAYER_PREFIX}{j}.output.LayerNorm{INPUT_SUFFIX}" for j in range(len(model.bert.encoder.layer))]

    def head_matmul_params(self, cfg: Any, data_cfg: Any) -> float:
        """The MLM head (transform + tied decoder) runs only on the selected positions."""
        return (cfg.padded_vocab_size * cfg.hidden_size + cfg.hidden_size ** 2) * _mlm_probability(data_cfg)

    def synthetic_batch(self, cfg: Any, generator: torch.Generator) -> Batch:
        batch = super().synthetic_batch(cfg, generator)
        labels = batch.labels.clone()
        labels[torch.rand(labels.shape, generator=generator) >= cfg.data.mlm_probability] = IGNORE_INDEX
        return Batch(batch.inputs, labels)


def _mlm_probability(data_cfg: BertDataConfig | None) -> float:
    """The selected fraction of positions: the run's data.mlm_probability, or its default without a run."""
    return (data_cfg or BertDataConfig()).mlm_probability
