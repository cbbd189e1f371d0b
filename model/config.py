"""Typed configuration of the text families' model (the `model:` section of a run config); the `attention:`
section is model/attention_config.py's (re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from model.attention_config import ATTENTION_BACKENDS, GATE_TYPES, SOFTMAX_VARIANTS, AttentionConfig

@dataclass
class ModelConfig:
    """The `model:` section of the text families (OPT decoder, BERT encoder: `family`). Defaults are OPT-125m's
    published shape. Other families bring their own config class (FamilySpec.model_config_class)."""

    family: str = "opt"
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_hidden_size: int = 3072
    max_position_embeddings: int = 2048
    vocab_size: int = 50272
    # Megatron's make-vocab-size-divisible-by: the embedding is padded so TP can split it evenly.
    pad_vocab_to_multiple_of: int = 1
    init_std: float = 0.006
    dropout: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # Biases of the attention's q/k/v/out projections (OPT has them; Guo et al.'s Bigram-Backcopy model does not).
    attention_bias: bool = True
    # Std of the token and position embeddings' normal init; null = init_std. 1.0 is PyTorch's nn.Embedding
    # default, which Guo et al.'s model keeps.
    embedding_init_std: float | None = None
    type_vocab_size: int = 2  # BERT's token-type (segment) embeddings; unused by OPT
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return ((self.vocab_size + m - 1) // m) * m

    def sequence_length(self, seq_length: int | None) -> int:
        """The length a model is built for: `seq_length` (default max_position_embeddings), checked."""
        seq_length = seq_length or self.max_position_embeddings
        if seq_length > self.max_position_embeddings:
            raise ValueError(f"seq_length={seq_length} exceeds model.max_position_embeddings="
                             f"{self.max_position_embeddings}")
        return seq_length

    def validate(self) -> None:
        from model.family import spec_for

        spec = spec_for(self.family)  # one line naming model.family if it is not a known family
        for key in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "max_position_embeddings",
                    "vocab_size", "pad_vocab_to_multiple_of", "type_vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}", value, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.num_heads", self.num_heads,
                              f"must divide model.hidden_size={self.hidden_size}")
        for key in ("dropout", "attention_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key}", value, "must lie in [0, 1)")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", self.init_std, "must be positive")
        if self.embedding_init_std is not None and not (isinstance(self.embedding_init_std, (int, float))
                                                        and self.embedding_init_std > 0):
            raise ConfigError("model.embedding_init_std", self.embedding_init_std, "must be positive or null")
        for key in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"model.{key}", getattr(self, key), "must be true or false")
        if self.family != "opt":  # only the OPT decoder reads these two
            if not self.attention_bias:
                raise ConfigError("model.attention_bias", False, f"is an OPT setting (model.family={self.family})")
            if self.embedding_init_std is not None:
                raise ConfigError("model.embedding_init_std", self.embedding_init_std,
                                  f"is an OPT setting (model.family={self.family})")
        if self.layer_norm_eps <= 0:
            raise ConfigError("model.layer_norm_eps", self.layer_norm_eps, "must be positive (it keeps LayerNorm "
                              "from dividing by zero)")
        spec.validate_model(self)
        self.attention.validate()


__all__ = ["ATTENTION_BACKENDS", "GATE_TYPES", "SOFTMAX_VARIANTS", "AttentionConfig", "ModelConfig"]
