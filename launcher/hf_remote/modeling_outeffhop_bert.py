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

softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)): the attention may put weight on "nothing".
The probabilities are computed as the training code's eager reference does (numerically stable;
a query that may attend to no key gets zeros).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertForMaskedLM, BertSelfAttention

try:  # transformers 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init  # type: ignore[no-redef]

ATTENTION_VARIANTS = ("softmax", "softmax1", "clipped_softmax", "clipped_softmax1", "learnable_sink")
ATTN_IMPLEMENTATION = "outeffhop_bert"
# This project's settings in config.json; a config without them is plain softmax BERT.
DEFAULTS = {"attention_variant": "softmax", "clip_gamma": -0.025, "clip_zeta": 1.0, "attention_gated": False,
            "gate_type": "linear", "gate_hidden": 16, "gate_init_prob": 0.25}


def _setting(config: BertConfig, name: str):
    return getattr(config, name, DEFAULTS[name])


def attention_probabilities(logits: torch.Tensor, variant: str, sink_logit: torch.Tensor | None = None,
                            gamma: float = -0.025, zeta: float = 1.0) -> torch.Tensor:
    """Probabilities over the last dim of logits whose masked entries are -inf."""
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention_variant {variant!r} (expected one of {', '.join(ATTENTION_VARIANTS)})")
    row_max = logits.amax(dim=-1, keepdim=True)
    if variant in ("softmax", "clipped_softmax"):
        fully_masked = torch.isneginf(row_max)
        row_max = torch.where(fully_masked, torch.zeros_like(row_max), row_max)
        exp = torch.exp(logits - row_max)
        denom = exp.sum(dim=-1, keepdim=True)
        probs = exp / torch.where(fully_masked, torch.ones_like(denom), denom)
    else:  # one implicit extra logit b: 0 for softmax1, a learned per-head value for the sink
        sink = torch.zeros((), dtype=logits.dtype, device=logits.device) if sink_logit is None else sink_logit
        row_max = torch.maximum(row_max, sink)
        exp = torch.exp(logits - row_max)
        probs = exp / (exp.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max))
    if variant.startswith("clipped"):
        probs = torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)
    return probs


def _allowed(mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """transformers' attention mask (None, bool or additive float) -> bool "may attend", None = everywhere.
    BERT is bidirectional: no mask means no padding, not causal."""
    if mask is None:
        return None
    mask = mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


def outeffhop_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function interface ([batch, heads, seq, head_dim] in, [batch, seq, heads,
    head_dim] out) for `module.variant`; registered as attn_implementation "outeffhop_bert"."""
    variant = getattr(module, "variant", None)
    if variant is None:  # transformers' own BertSelfAttention: it lacks the variant's parameters
        raise ValueError("this BERT uses an OutEffHop attention variant: load it with AutoModelForMaskedLM."
                         "from_pretrained(folder, trust_remote_code=True)")
    if getattr(module, "is_causal", False):
        raise ValueError("OutEffHop BERT attention is bidirectional: config.is_decoder must be False")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    allowed = _allowed(attention_mask, key.shape[-2])
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    sink = module.sink_logit.view(-1, 1, 1).float() if getattr(module, "sink_logit", None) is not None else None
    probs = attention_probabilities(logits, variant, sink, module.gamma, module.zeta).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


try:  # a name transformers accepts only once this file is loaded (see the module docstring)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, outeffhop_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # boolean masks, None without padding
except ImportError:  # pragma: no cover - transformers 4: no such registries (use transformers 5)
    pass


class HeadGate(nn.Module):
    """Per-token, per-head gate: head h's context is scaled by sigmoid(w_h . x_h + b_h), where x_h is the
    h-th head_dim slice of the attention input (`gate_type: mlp` puts a small ReLU layer in between)."""

    def __init__(self, num_heads: int, head_dim: int, gate_type: str, hidden: int) -> None:
        super().__init__()
        self.gate_type = gate_type
        in_dim = head_dim
        if gate_type == "mlp":
            self.hidden_weight = nn.Parameter(torch.zeros(num_heads, head_dim, hidden))
            self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden))
            in_dim = hidden
        self.weight = nn.Parameter(torch.zeros(num_heads, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x_heads: torch.Tensor) -> torch.Tensor:
        """x_heads [batch, seq, heads, head_dim] -> gate [batch, seq, heads, 1]."""
        if self.gate_type == "mlp":
            x_heads = torch.relu(torch.einsum("bthd,hdk->bthk", x_heads, self.hidden_weight) + self.hidden_bias)
        logits = torch.einsum("bthd,hd->bth", x_heads, self.weight) + self.bias
        return torch.sigmoid(logits).unsqueeze(-1)


class OutEffHopBertSelfAttention(BertSelfAttention):
    """BERT self-attention with the configured softmax variant, its sink logits and optional head gate.
    The output projection stays transformers' `attention.output.dense`, as in stock BERT."""

    def __init__(self, config: BertConfig, is_causal: bool = False, layer_idx: int | None = None) -> None:
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        self.variant = _setting(config, "attention_variant")
        self.gamma, self.zeta = _setting(config, "clip_gamma"), _setting(config, "clip_zeta")
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        self.sink_logit = nn.Parameter(torch.zeros(heads)) if self.variant == "learnable_sink" else None
        self.gate = (HeadGate(heads, head_dim, _setting(config, "gate_type"), _setting(config, "gate_hidden"))
                     if _setting(config, "attention_gated") else None)

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
            context = context * self.gate(hidden_states.view(heads)).to(context.dtype)
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
        if isinstance(module, OutEffHopBertSelfAttention) and module.sink_logit is not None:
            init.zeros_(module.sink_logit)
        elif isinstance(module, HeadGate):
            std, p = self.config.initializer_range, _setting(self.config, "gate_init_prob")
            for param in (module.weight, getattr(module, "hidden_weight", None)):
                if param is not None:
                    init.normal_(param, mean=0.0, std=std)
            if getattr(module, "hidden_bias", None) is not None:
                init.zeros_(module.hidden_bias)
            init.constant_(module.bias, math.log(p / (1.0 - p)))
