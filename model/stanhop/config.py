"""The `model:` and `attention:` sections of a STanHop-Net run (Wu et al., ICLR 2024, arXiv 2312.17346).

The window geometry (in_len, out_len, num_series) lives here, once: it fixes parameter shapes (learned
segment positions, prediction heads), and the data loader reads it from `cfg.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError
from model.attention_config import AttentionConfig

# The OutEffHop STanHop study's normalisers (its `--mode`); any other registered variant works too.
STANHOP_VARIANTS = ("entmax", "softmax", "softmax1", "sparsemax", "clipped_softmax", "clipped_softmax1")


@dataclass
class StanhopAttentionConfig(AttentionConfig):
    """The Hopfield layers' normaliser, from the attention variant registry (model/variants.py). Defaults:
    STanHop's entmax (alpha learned per head from 1.5); clipped variants with OutEffHop's STanHop values
    (eta = zeta = 1.1, gamma = -0.1)."""

    variant: str = "entmax"
    gamma: float = -0.1
    zeta: float = 1.1

    def validate(self) -> None:
        super().validate()
        if self.gated:
            raise ConfigError("attention.gated", self.gated, "is not supported by model.family=stanhop (its Hopfield "
                              "layers have no gate)")


@dataclass
class StanhopConfig:
    """STanHop-Net's shape. Defaults: the OutEffHop ETTh1 recipe (168 -> 24, segments of 6, 11 encoder layers,
    d_model 256, d_ff 512, 4 heads, 10 pooling queries, no segment merging: its scripts never set win_size)."""

    family: str = "stanhop"
    num_series: int = 7  # columns of the CSV that are forecast (ETTh1: 7)
    in_len: int = 168  # input steps
    out_len: int = 24  # forecast horizon
    seg_len: int = 6  # steps per segment (patch)
    merge_window: int = 1  # segments merged between scales (Crossformer's win_size); 1 = one scale
    num_layers: int = 11  # encoder STanHop blocks (the decoder has num_layers + 1)
    d_model: int = 256
    d_ff: int = 512
    num_heads: int = 4
    pool_queries: int = 10  # learned query patterns of the cross-series HopfieldPooling (Crossformer's routers)
    dropout: float = 0.2
    # Tune-and-Play external memory: a HopfieldLayer with this many learned patterns after every encoder block
    # (0 = off, the default and OutEffHop's setting).
    memory_patterns: int = 0
    attention: StanhopAttentionConfig = field(default_factory=StanhopAttentionConfig)

    @property
    def in_segments(self) -> int:
        return -(-self.in_len // self.seg_len)

    @property
    def out_segments(self) -> int:
        return -(-self.out_len // self.seg_len)

    def scale_segments(self) -> list[int]:
        """Segments per series at the embedding and after each encoder layer (merging from the second on)."""
        counts = [self.in_segments, self.in_segments]
        for _ in range(1, self.num_layers):
            counts.append(-(-counts[-1] // self.merge_window))
        return counts

    def validate(self) -> None:
        if self.family != "stanhop":
            raise ConfigError("model.family", self.family, "must be stanhop for this config class")
        for key in ("num_series", "in_len", "out_len", "seg_len", "merge_window", "num_layers", "d_model", "d_ff",
                    "num_heads", "pool_queries"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{key}", value, "must be a positive integer")
        if not isinstance(self.memory_patterns, int) or self.memory_patterns < 0:
            raise ConfigError("model.memory_patterns", self.memory_patterns, "must be an integer >= 0 (0 = off)")
        if self.d_model % self.num_heads:
            raise ConfigError("model.num_heads", self.num_heads, f"must divide model.d_model={self.d_model}")
        if self.seg_len > self.in_len:
            raise ConfigError("model.seg_len", self.seg_len, f"must be <= model.in_len={self.in_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", self.dropout, "must lie in [0, 1)")
        self.attention.validate()
