"""This project's ViT state dict <-> timm's `VisionTransformer` state dict (the same weights, renamed).

Every name is timm's except inside attention: timm fuses q, k, v into one `attn.qkv` Linear (rows q, then k,
then v) and calls the output projection `attn.proj`; this project's MultiHeadAttention has q_proj, k_proj,
v_proj and out_proj. Variant-only parameters (the learnable sink's logits, the gate) have no timm
counterpart: they keep their names, so a timm model only loads a softmax model's weights.
"""

from __future__ import annotations

import re

import torch

_ATTN = re.compile(r"^(blocks\.\d+\.attn)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$")
_QKV = re.compile(r"^(blocks\.\d+\.attn)\.qkv\.(weight|bias)$")
_PROJ = re.compile(r"^(blocks\.\d+\.attn)\.proj\.(weight|bias)$")


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Project names -> timm names (q/k/v concatenated into qkv)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _ATTN.match(name)
        if match is None:
            out[name] = tensor
        elif match.group(2) == "out_proj":
            out[f"{match.group(1)}.proj.{match.group(3)}"] = tensor
        else:
            pending.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = tensor
    for (prefix, kind), parts in pending.items():
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> project names (qkv split into three equal row blocks)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if (match := _QKV.match(name)) is not None:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{match.group(1)}.{part}.{match.group(2)}"] = chunk.clone()
        elif (match := _PROJ.match(name)) is not None:
            out[f"{match.group(1)}.out_proj.{match.group(2)}"] = tensor
        else:
            out[name] = tensor
    return out


def timm_kwargs(cfg: object) -> dict[str, object]:
    """timm.models.vision_transformer.VisionTransformer arguments of a ViTConfig (softmax attention)."""
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,  # type: ignore[attr-defined]
            "num_classes": cfg.num_classes, "embed_dim": cfg.hidden_size, "depth": cfg.num_layers,  # type: ignore[attr-defined]
            "num_heads": cfg.num_heads, "mlp_ratio": cfg.ffn_hidden_size / cfg.hidden_size,  # type: ignore[attr-defined]
            "qkv_bias": True, "class_token": True, "global_pool": "token"}
