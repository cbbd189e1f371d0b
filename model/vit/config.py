"""The `model:` section of a ViT run: timm VisionTransformer's shape, with this project's attention variants."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError
from model.attention_config import AttentionConfig


@dataclass
class ViTConfig:
    """A ViT with a class token, learned positions, pre-LN blocks and a linear head on the class token.

    Defaults are timm's `vit_small_patch16_224` (ViT-S/16). Names that OPT and BERT share (num_layers,
    hidden_size, num_heads, ffn_hidden_size, dropout, ...) mean the same here; timm's names are in comments.
    """

    family: str = "vit"
    image_size: int = 224  # timm img_size: the learned positions are for this grid of patches
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    num_layers: int = 12  # depth
    hidden_size: int = 384  # embed_dim
    num_heads: int = 6
    ffn_hidden_size: int = 1536  # embed_dim * mlp_ratio
    init_std: float = 0.02  # Linear weights and positions (timm: trunc_normal_(std=.02))
    dropout: float = 0.0  # timm proj_drop_rate, pos_drop_rate and drop_rate (head)
    attention_dropout: float = 0.0  # attn_drop_rate
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks (timm's rule)
    layer_norm_eps: float = 1e-6
    # The training objective's label smoothing (hard labels; mixup/cutmix targets carry it already).
    label_smoothing: float = 0.1
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def seq_length(self) -> int:
        """Positions attention runs over: the patches and the class token."""
        return self.num_patches + 1

    def sequence_length(self, seq_length: int | None) -> int:
        if seq_length not in (None, self.seq_length):
            raise ValueError(f"a ViT of image_size={self.image_size}, patch_size={self.patch_size} attends over "
                             f"{self.seq_length} positions, not {seq_length}")
        return self.seq_length

    def validate(self) -> None:
        if self.family != "vit":
            raise ConfigError("model.family", self.family, "must be vit for this model section")
        for key in ("image_size", "patch_size", "in_chans", "num_classes", "num_layers", "hidden_size", "num_heads",
                    "ffn_hidden_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{key}", value, "must be a positive integer")
        if self.image_size % self.patch_size:
            raise ConfigError("model.image_size", self.image_size,
                              f"must be divisible by model.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.num_heads", self.num_heads, f"must divide model.hidden_size={self.hidden_size}")
        for key in ("dropout", "attention_dropout", "drop_path_rate", "label_smoothing"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key}", value, "must lie in [0, 1)")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", self.init_std, "must be positive")
        if self.layer_norm_eps <= 0:
            raise ConfigError("model.layer_norm_eps", self.layer_norm_eps, "must be positive")
        self.attention.validate()
