"""ViT as DeepSpeed pipeline stages (LayerSpecs), built from the same modules as model/vit/model.py.

Stages: embedding (patch embedding, class token, positions) | Block x L | head (final LayerNorm, class token,
classifier), whose logits meet the labels in the classification loss. Nothing is tied between stages.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from deepspeed.pipe import LayerSpec

from model.family import PipelineParts
from model.layers import LocalLayers
from model.vit.config import ViTConfig
from model.vit.model import Block, Embedding, Head, classification_loss, drop_path_rates


def pipeline_parts(cfg: ViTConfig, seq_length: int, layers: LocalLayers) -> PipelineParts:
    specs: list[Any] = [LayerSpec(Embedding, cfg)]
    specs += [LayerSpec(Block, cfg, layers, rate) for rate in drop_path_rates(cfg)]
    specs += [LayerSpec(Head, cfg, layers)]
    return PipelineParts(specs, partial(_loss, cfg.label_smoothing), Block.__name__)


def _loss(label_smoothing: float, logits: Any, labels: Any) -> Any:
    return classification_loss(logits, labels, label_smoothing)


def canonical_name(name: str, cfg: ViTConfig) -> str:
    """PipelineModule parameter name ("3.mlp.fc1.weight") -> the single-process name ("blocks.2.mlp.fc1.weight").

    The embedding and head stages use the model's own attribute names (patch_embed, cls_token, pos_embed; norm,
    head), which sit at the top level of VisionTransformer."""
    index, rest = name.split(".", 1)
    idx = int(index)
    if idx == 0 or idx == cfg.num_layers + 1:
        return rest
    if 1 <= idx <= cfg.num_layers:
        return f"blocks.{idx - 1}.{rest}"
    raise ValueError(f"unexpected pipeline parameter {name!r}")
