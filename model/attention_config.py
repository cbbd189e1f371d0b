"""The `attention:` section of a run config: the variant (model/variants.py), its settings, backend and gate.
Its own module, below model/config.py (the text families' `model:` section, which looks up the family):
the attention layer imports it without the family registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from model import variants

# The built-in attention variants (model/variants.py registers them; a config may also name
# `package.module:NAME`).
SOFTMAX_VARIANTS = variants.names()
ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "triton")
GATE_TYPES = ("linear", "mlp")


@dataclass
class AttentionConfig:
    variant: str = "softmax1"
    backend: str = "auto"
    # Clipped softmax: clip((zeta - gamma) * p + gamma, 0, 1). When `alpha` is set, gamma = -alpha / seq_length
    # (the QC paper's OPT recipe, alpha = 12); otherwise `gamma` is used as given.
    gamma: float = -0.025
    zeta: float = 1.0
    alpha: float | None = None
    # entmax: the initial alpha of every head (learned per head, in (1, 2)).
    entmax_alpha: float = 1.5
    # Settings of a variant that has no field here (e.g. one registered outside this repository), by key.
    params: dict[str, Any] = field(default_factory=dict)
    # Gated attention ("conditional per token"): an orthogonal flag that works with every variant.
    gated: bool = False
    gate_type: str = "linear"
    gate_hidden: int = 16
    gate_init_prob: float = 0.25

    def validate(self) -> None:
        variants.check_config(self)  # the variant and its settings
        if self.backend not in ATTENTION_BACKENDS:
            raise ConfigError("attention.backend", self.backend, f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.gate_type not in GATE_TYPES:
            raise ConfigError("attention.gate_type", self.gate_type, f"must be one of {', '.join(GATE_TYPES)}")
        if not 0.0 < self.gate_init_prob < 1.0:
            raise ConfigError("attention.gate_init_prob", self.gate_init_prob, "must lie strictly between 0 and 1")
        if self.gate_hidden <= 0:
            raise ConfigError("attention.gate_hidden", self.gate_hidden, "must be positive")

    def variant_params(self, seq_length: int) -> dict[str, Any]:
        """Keyword arguments that `scaled_dot_product` takes for this variant (its settings, resolved)."""
        return variants.keywords_of(self, seq_length)
