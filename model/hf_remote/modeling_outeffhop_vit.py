"""ViT image classifier with a pluggable attention softmax (softmax1 / OutEffHop, clipped, learnable sink, gated).

Shipped next to the weights by the ViT export (model/vit/hf.py) and loaded with
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`. Self-contained: it imports
only torch and transformers (written against transformers 5.x). Everything but the attention is transformers'
own ViTForImageClassification (pre-LN blocks, exact GELU, class-token classifier: the same function as timm's
VisionTransformer), so weight names are transformers'; each layer's `attention` is replaced by
`OutEffHopViTAttention`, which adds the variant's parameters (`sink_logit`, `gate.*`).

The folder's config is a plain ViTConfig (model_type "vit") with the variant's settings as extra keys. A
non-softmax export also names the attention implementation "outeffhop_vit", which this module registers:
stock ViTForImageClassification refuses it instead of silently computing plain softmax attention.
The variant math, head gate and eager attention are outeffhop_attention.py's (shipped alongside).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTAttention, ViTForImageClassification

from .outeffhop_attention import VARIANTS, attach_variant, eager_attention, init_variant_weights, mask_to_allowed

try:  # transformers 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init  # type: ignore[no-redef]

ATTENTION_VARIANTS = tuple(VARIANTS)
ATTN_IMPLEMENTATION = "outeffhop_vit"


def outeffhop_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function interface for `module.variant` (registered as "outeffhop_vit");
    bidirectional: no mask means every patch sees every patch."""
    if getattr(module, "variant", None) is None:  # transformers' own ViTAttention lacks the variant's parameters
        raise ValueError("this ViT uses an OutEffHop attention variant: load it with AutoModelForImageClassification."
                         "from_pretrained(folder, trust_remote_code=True)")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return eager_attention(module, query, key, value, mask_to_allowed(attention_mask, key.shape[-2]), scaling, dropout)


try:  # a name transformers accepts only once this file is loaded (see the module docstring)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, outeffhop_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
except ImportError:  # pragma: no cover - transformers 4
    pass


class OutEffHopViTAttention(ViTAttention):
    """ViT self-attention with the configured softmax variant, its sink logits and optional head gate."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        attach_variant(self, config, self.num_attention_heads, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, self.num_attention_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        context, probs = outeffhop_attention(self, query, key, value, attention_mask, self.scaling,
                                             dropout=self.attention_dropout if self.training else 0.0)
        if self.gate is not None:  # the gate reads the attention's (normed) input, head by head
            context = context * self.gate(hidden_states.view(heads)).transpose(1, 2).to(context.dtype)
        return self.o_proj(context.reshape(*input_shape, -1)), probs


class OutEffHopViTForImageClassification(ViTForImageClassification):
    # The attention is this file's own code: transformers' fused kernels know only plain softmax.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        for layer in self.vit.layers:
            layer.attention = OutEffHopViTAttention(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_variant_weights(module, self.config, init, self.config.initializer_range)
