"""BERT masked LM with a pluggable attention softmax (softmax1 / OutEffHop, clipped, learnable sink, gated heads).

Shipped next to the weights by `python -m launcher.export_hf` and loaded with
`AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained: it imports only
torch and transformers (written against transformers 5.x). Everything but the attention is transformers'
own BertForMaskedLM, so weight names, the MLM head and the loss are BERT's; each layer's
`attention.self` is replaced by `OutEffHopBertSelfAttention`, which adds the variant's parameters
(`sink_logit`, `gate.*`).

The folder's config is a plain BertConfig (model_type "bert", so AutoConfig and AutoTokenizer never ask
for remote code) with the variant's settings as extra keys (the same keys as the OPT export's). A
non-softmax export also names the attention implementation "outeffhop_bert", which this module
registers: stock BertForMaskedLM refuses it instead of silently computing plain softmax attention with
these weights. (Its own name, not the OPT file's "outeffhop": a key padding mask of None means "attend
everywhere" here but "causal" there, and both files may be loaded in one process.)

The variant math, the head gate and the eager attention are outeffhop_attention.py's (shipped alongside;
the training code runs the same file), so the probabilities are the training code's eager reference.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertForMaskedLM, BertSelfAttention

from .outeffhop_attention import (VARIANTS, attach_variant, eager_attention, init_variant_weights, mask_to_allowed,
                                  register_attention)

try:  # transformers 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init  # type: ignore[no-redef]

ATTENTION_VARIANTS = tuple(VARIANTS)
ATTN_IMPLEMENTATION = "outeffhop_bert"


def outeffhop_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function interface ([batch, heads, seq, head_dim] in, [batch, seq, heads,
    head_dim] out) for `module.variant`; registered as attn_implementation "outeffhop_bert". BERT is
    bidirectional: no mask means no padding, not causal."""
    if getattr(module, "variant", None) is None:  # transformers' own BertSelfAttention: it lacks the variant's parameters
        raise ValueError("this BERT uses an OutEffHop attention variant: load it with AutoModelForMaskedLM."
                         "from_pretrained(folder, trust_remote_code=True)")
    if getattr(module, "is_causal", False):
        raise ValueError("OutEffHop BERT attention is bidirectional: config.is_decoder must be False")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return eager_attention(module, query, key, value, mask_to_allowed(attention_mask, key.shape[-2]), scaling, dropout)


register_attention(ATTN_IMPLEMENTATION, outeffhop_attention)  # a name transformers accepts once this file is loaded


class OutEffHopBertSelfAttention(BertSelfAttention):
    """BERT self-attention with the configured softmax variant, its sink logits and optional head gate.
    The output projection stays transformers' `attention.output.dense`, as in stock BERT."""

    def __init__(self, config: BertConfig, is_causal: bool = False, layer_idx: int | None = None) -> None:
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        attach_variant(self, config, self.num_attention_heads, self.attention_head_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if past_key_values is not None:
            raise ValueError("OutEffHop BERT is an encoder: it has no KV cache")
        kwargs.pop("encoder_hidden_states", None)  # None for self-attention (BertAttention always passes it)
        batch, q_len, _ = hidden_states.shape
        heads = (batch, q_len, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(heads).transpose(1, 2)
        key = self.key(hidden_states).view(heads).transpose(1, 2)
        value = self.value(hidden_states).view(heads).transpose(1, 2)
        context, probs = outeffhop_attention(self, query, key, value, attention_mask, self.scaling,
                                             dropout=self.dropout.p if self.training else 0.0)
        if self.gate is not None:
            context = context * self.gate(hidden_states.view(heads)).transpose(1, 2).to(context.dtype)
        return context.reshape(batch, q_len, -1), probs


class OutEffHopBertForMaskedLM(BertForMaskedLM):
    # The attention is this file's own code: transformers' fused kernels know only plain softmax.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        for index, layer in enumerate(self.bert.encoder.layer):
            layer.attention.self = OutEffHopBertSelfAttention(config, is_causal=config.is_decoder, layer_idx=index)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_variant_weights(module, self.config, init, self.config.initializer_range)
