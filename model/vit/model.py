"""Vision Transformer (Dosovitskiy et al., 2021) as timm's `VisionTransformer`, with a pluggable attention softmax.

Patch embedding (a strided Conv2d), a class token, learned positions, pre-LayerNorm blocks with a GELU MLP, a
final LayerNorm and a linear head on the class token. Parameter names follow timm one to one
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.norm1`, `blocks.N.mlp.fc1`, `norm`, `head`, ...)
except inside attention, which is this project's `MultiHeadAttention` (every variant and backend, run
bidirectionally): timm's fused `attn.qkv` is `attn.q_proj/k_proj/v_proj` here and `attn.proj` is
`attn.out_proj` (model/vit/hf.py maps them). Parallelism is chosen by the layer factory (model/layers.py):
q/k/v and fc1 column-parallel, out_proj and fc2 row-parallel, everything else replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import MultiHeadAttention
from model.layers import IGNORE_INDEX, LocalLayers
from model.vit.config import ViTConfig
from model.taps import Tap
from model.vit.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
from timm.layers import DropPath, PatchEmbed  # noqa: E402  (after the torchvision fix above)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross entropy. Hard labels [B] (class ids; -100 ignored) are smoothed by `label_smoothing`; soft
    targets [B, classes] (mixup / cutmix, which already smooth them) are used as given."""
    logits = logits.float()
    if labels.is_floating_point():
        return F.cross_entropy(logits, labels.float())
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def drop_path_rates(cfg: ViTConfig) -> list[float]:
    """timm's stochastic-depth schedule: 0 at the first block rising linearly to drop_path_rate at the last."""
    if cfg.num_layers == 1:
        return [0.0]
    return [cfg.drop_path_rate * i / (cfg.num_layers - 1) for i in range(cfg.num_layers)]


class Mlp(nn.Module):
    """fc1 (column-parallel), GELU, fc2 (row-parallel): timm's Mlp."""

    def __init__(self, cfg: ViTConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.layers = layers
        self.fc1 = layers.column(cfg.hidden_size, cfg.ffn_hidden_size)
        self.act = nn.GELU()
        self.act_out = Tap(fused_with="fc1")  # GELU(fc1(x)), what fc2 reads (quantized by W8A8)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.fc2 = layers.row(cfg.ffn_hidden_size, cfg.hidden_size)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_out(self.act(self.fc1(x)))
        if self.training and self.drop1.p > 0:
            with self.layers.model_parallel_rng():  # this rank's slice of the FFN units
                hidden = self.drop1(hidden)
        return self.drop2(self.fc2(hidden))


class Block(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's Block without layer scale)."""

    def __init__(self, cfg: ViTConfig, layers: LocalLayers, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.attention, seq_length=cfg.seq_length,
                                       dropout=cfg.attention_dropout, init_std=cfg.init_std, layers=layers,
                                       causal=False)
        self.proj_drop = nn.Dropout(cfg.dropout)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn_residual = Tap()  # the residual sums (quantized by W8A8)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg, layers)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn_residual = Tap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_residual(x + self.drop_path1(self.proj_drop(self.attn(self.norm1(x)))))
        return self.ffn_residual(x + self.drop_path2(self.mlp(self.norm2(x))))


class Embedding(nn.Module):
    """Patches -> tokens, the class token in front, plus learned positions (timm's `_pos_embed`).

    A module of its own so that the pipeline's first stage is exactly this; in VisionTransformer its
    parameters sit at the top level (`patch_embed.proj`, `cls_token`, `pos_embed`), as in timm."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=cfg.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_length, cfg.hidden_size))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.embed_sum = Tap()  # patches + positions (quantized by W8A8)
        nn.init.trunc_normal_(self.pos_embed, std=cfg.init_std)
        nn.init.normal_(self.cls_token, std=1e-6)  # timm's init

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.pos_drop(self.embed_sum(tokens + self.pos_embed))


class Head(nn.Module):
    """Final LayerNorm, the class token, dropout, the classifier (replicated under TP: it is small)."""

    def __init__(self, cfg: ViTConfig, layers: LocalLayers) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = layers.replicated(cfg.hidden_size, cfg.num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.norm(tokens)[:, 0]))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, seq_length: int | None = None, layers: LocalLayers | None = None) -> None:
        super().__init__()
        cfg.validate()
        cfg.sequence_length(seq_length)
        self.config = cfg
        self.layers = layers or LocalLayers(cfg.init_std)
        embedding = Embedding(cfg)
        # timm's names: these live at the top level, not under an `embedding.` prefix.
        self.patch_embed, self.cls_token, self.pos_embed = embedding.patch_embed, embedding.cls_token, embedding.pos_embed
        self.pos_drop, self.embed_sum = embedding.pos_drop, embedding.embed_sum
        self.blocks = nn.ModuleList(Block(cfg, self.layers, rate) for rate in drop_path_rates(cfg))
        head = Head(cfg, self.layers)
        self.norm, self.head_drop, self.head = head.norm, head.head_drop, head.head

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return Embedding.forward(self, pixels)  # type: ignore[arg-type]  (same attribute names)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] -> final-normed tokens [B, 1 + patches, hidden] (timm's forward_features)."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_classes]; with `labels` ([B] class ids or [B, num_classes] soft targets), the mean
        classification loss instead."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        logits = Head.forward(self, x)  # type: ignore[arg-type]
        if labels is None:
            return logits
        return classification_loss(logits, labels, self.config.label_smoothing)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.pos_embed), None)
            params.pop(id(self.cls_token), None)
        return sum(p.numel() for p in params.values())
