"""OPT with a pluggable attention softmax (softmax1 / OutEffHop, clipped, learnable sink, gated heads).

Shipped next to the weights by `python -m launcher.export_hf` and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained: it imports only
torch and transformers (written against transformers 5.x). Everything but the attention is transformers'
own OPT, so weight names, generation and the KV cache are OPT's; each layer's `self_attn` is replaced
by `OutEffHopOPTAttention`, which adds the variant's parameters (`sink_logit`, `gate.*`).

The folder's config is a plain OPTConfig (model_type "opt", so AutoConfig and AutoTokenizer never ask
for remote code) with the variant's settings as extra keys. A non-softmax export also names the
attention implementation "outeffhop", which this module registers: stock OPTForCausalLM refuses it
instead of silently computing plain softmax attention with these weights.

The variant math, the head gate and the eager attention are outeffhop_attention.py's (shipped alongside;
the training code runs the same file), so the probabilities are the training code's eager reference.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM

from .outeffhop_attention import (VARIANTS, attach_variant, eager_attention, init_variant_weights, mask_to_allowed,
                                  register_attention)

try:  # transformers 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init  # type: ignore[no-redef]

ATTENTION_VARIANTS = tuple(VARIANTS)
ATTN_IMPLEMENTATION = "outeffhop"


def outeffhop_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function interface ([batch, heads, seq, head_dim] in, [batch, seq, heads,
    head_dim] out) for `module.variant`; registered as attn_implementation "outeffhop"."""
    if getattr(module, "variant", None) is None:  # transformers' own OPTAttention: it lacks the variant's parameters
        raise ValueError("this OPT uses an OutEffHop attention variant: load it with AutoModelForCausalLM."
                         "from_pretrained(folder, trust_remote_code=True)")
    q_len, k_len = query.shape[-2], key.shape[-2]
    allowed = mask_to_allowed(attention_mask, k_len)
    if allowed is None:  # causal, aligned so that the last query sees every (cached) key
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    return eager_attention(module, query, key, value, allowed, scaling, dropout)


register_attention(ATTN_IMPLEMENTATION, outeffhop_attention)  # a name transformers accepts once this file is loaded


class OutEffHopOPTAttention(OPTAttention):
    """OPT attention with the configured softmax variant, its sink logits and optional head gate."""

    def __init__(self, config: OPTConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, layer_idx=layer_idx)
        attach_variant(self, config, self.num_heads, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, attention_mask: torch.Tensor | None = None,
                output_attentions: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        past_key_values = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
        batch, q_len, _ = hidden_states.shape
        heads = (batch, q_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        context, probs = outeffhop_attention(self, query, key, value, attention_mask, self.scaling,
                                             dropout=self.dropout if self.training else 0.0)
        if self.gate is not None:
            context = context * self.gate(hidden_states.view(heads)).transpose(1, 2).to(context.dtype)
        return self.out_proj(context.reshape(batch, q_len, -1)), probs


class OutEffHopOPTForCausalLM(OPTForCausalLM):
    # The attention is this file's own code: transformers' fused kernels know only plain softmax.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        for index, layer in enumerate(self.model.decoder.layers):
            layer.self_attn = OutEffHopOPTAttention(config, layer_idx=index)
        for module in self.modules():  # transformers' OPT fixes eps at 1e-5
            if isinstance(module, nn.LayerNorm):
                module.eps = getattr(config, "layer_norm_eps", 1e-5)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_variant_weights(module, self.config, init, self.config.init_std)
