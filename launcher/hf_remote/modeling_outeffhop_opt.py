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

softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)): the attention may put weight on "nothing".
The probabilities are computed as the training code's eager reference does (numerically stable;
a query that may attend to no key gets zeros).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM

try:  # transformers 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init  # type: ignore[no-redef]

ATTENTION_VARIANTS = ("softmax", "softmax1", "clipped_softmax", "clipped_softmax1", "learnable_sink")
ATTN_IMPLEMENTATION = "outeffhop"
# This project's settings in config.json; a config without them is plain softmax OPT.
DEFAULTS = {"attention_variant": "softmax", "clip_gamma": -0.025, "clip_zeta": 1.0, "attention_gated": False,
            "gate_type": "linear", "gate_hidden": 16, "gate_init_prob": 0.25, "layer_norm_eps": 1e-5}


def _setting(config: OPTConfig, name: str):
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


def _allowed(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """transformers' attention mask (None, bool or additive float) -> bool "may attend" [.., q_len, k_len]."""
    if mask is None:  # causal, aligned so that the last query sees every (cached) key
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    mask = mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


def outeffhop_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function interface ([batch, heads, seq, head_dim] in, [batch, seq, heads,
    head_dim] out) for `module.variant`; registered as attn_implementation "outeffhop"."""
    variant = getattr(module, "variant", None)
    if variant is None:  # transformers' own OPTAttention: it lacks the variant's parameters
        raise ValueError("this OPT uses an OutEffHop attention variant: load it with AutoModelForCausalLM."
                         "from_pretrained(folder, trust_remote_code=True)")
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    allowed = _allowed(attention_mask, query.shape[-2], key.shape[-2], logits.device)
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    sink = module.sink_logit.view(-1, 1, 1).float() if getattr(module, "sink_logit", None) is not None else None
    probs = attention_probabilities(logits, variant, sink, module.gamma, module.zeta).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2), probs


try:  # a name transformers accepts only once this file is loaded (see the module docstring)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, outeffhop_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # boolean masks, None when only causal
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


class OutEffHopOPTAttention(OPTAttention):
    """OPT attention with the configured softmax variant, its sink logits and optional head gate."""

    def __init__(self, config: OPTConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, layer_idx=layer_idx)
        self.variant = _setting(config, "attention_variant")
        self.gamma, self.zeta = _setting(config, "clip_gamma"), _setting(config, "clip_zeta")
        self.sink_logit = nn.Parameter(torch.zeros(self.num_heads)) if self.variant == "learnable_sink" else None
        self.gate = (HeadGate(self.num_heads, self.head_dim, _setting(config, "gate_type"), _setting(config, "gate_hidden"))
                     if _setting(config, "attention_gated") else None)

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
            context = context * self.gate(hidden_states.view(heads)).to(context.dtype)
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
                module.eps = _setting(config, "layer_norm_eps")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, OutEffHopOPTAttention) and module.sink_logit is not None:
            init.zeros_(module.sink_logit)
        elif isinstance(module, HeadGate):
            std, p = self.config.init_std, _setting(self.config, "gate_init_prob")
            for param in (module.weight, getattr(module, "hidden_weight", None)):
                if param is not None:
                    init.normal_(param, mean=0.0, std=std)
            if getattr(module, "hidden_bias", None) is not None:
                init.zeros_(module.hidden_bias)
            init.constant_(module.bias, math.log(p / (1.0 - p)))
