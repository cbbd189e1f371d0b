"""OutEffHop attention variants: the softmax math, the head gate and the eager attention.

One definition for the training code (model/softmax.py and model/attention.py import it) and for every
exported Hugging Face folder, where it ships next to the family's modeling file (imported as
`from .outeffhop_attention import ...`; transformers' trust_remote_code loader copies it along).
Self-contained: it imports only torch (transformers only inside `register_attention`), so an export loads
without this project and the training code does not import transformers through it.

softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)) (OutEffHop, arXiv 2404.03828): attention may put weight on
"nothing". Every function takes logits whose masked entries are -inf and normalises over the last dim; a
row that may attend to no key gets zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Vanilla softmax; a fully masked row gives zeros instead of NaN."""
    row_max = logits.amax(dim=-1, keepdim=True)
    fully_masked = torch.isneginf(row_max)
    shifted = logits - torch.where(fully_masked, torch.zeros_like(row_max), row_max)
    exp = torch.exp(shifted)
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(fully_masked, torch.ones_like(denom), denom)


def softmax_with_sink(logits: torch.Tensor, sink_logit: torch.Tensor | float = 0.0) -> torch.Tensor:
    """exp(x_i) / (exp(b) + sum_j exp(x_j)): a softmax over the row plus one implicit "no-op" logit b.

    b = 0 is softmax1 (OutEffHop); a learnable per-head b is the "learnable sink". Stable form with
    m = max(max_j x_j, b): exp(x_i - m) / (sum_j exp(x_j - m) + exp(b - m)). A fully masked row gives zeros.
    """
    sink = torch.as_tensor(sink_logit, dtype=logits.dtype, device=logits.device)
    row_max = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
    exp = torch.exp(logits - row_max)
    return exp / (exp.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max))


def softmax1(logits: torch.Tensor) -> torch.Tensor:
    """softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)) (OutEffHop's separation function)."""
    return softmax_with_sink(logits, 0.0)


def clip_probabilities(probs: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """Clipped softmax stretch-and-clip: clip((zeta - gamma) * p + gamma, 0, 1) (Bondarenko et al., 2023)."""
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def clipped_softmax(logits: torch.Tensor, gamma: float = -0.025, zeta: float = 1.0) -> torch.Tensor:
    return clip_probabilities(softmax(logits), gamma, zeta)


def clipped_softmax1(logits: torch.Tensor, gamma: float = -0.025, zeta: float = 1.0) -> torch.Tensor:
    return clip_probabilities(softmax1(logits), gamma, zeta)


def learnable_sink(logits: torch.Tensor, sink_logit: torch.Tensor) -> torch.Tensor:
    """softmax_with_sink with a learned logit per head (`sink_logit` broadcastable to the logits)."""
    return softmax_with_sink(logits, sink_logit)


@dataclass(frozen=True)
class Exported:
    """How an export computes one variant: `probabilities(logits, **settings, **head parameter)`, the config.json
    key and default of each setting (keyword -> (key, default)), and its learned per-head parameter (the
    attention module's attribute and state-dict leaf name), if it has one."""

    probabilities: Callable[..., torch.Tensor]
    settings: dict[str, tuple[str, Any]] = field(default_factory=dict)
    head_param: str | None = None


CLIP_SETTINGS = {"gamma": ("clip_gamma", -0.025), "zeta": ("clip_zeta", 1.0)}
# The one definition of every variant an export computes. model/variants.py registers each from this entry
# (adding what training alone needs: setting checks, the fused backends), and launcher.export_hf /
# launcher.import_hf map settings to and from config.json keys through it, so an exported variant is the
# trained one.
VARIANTS: dict[str, Exported] = {
    "softmax": Exported(softmax), "softmax1": Exported(softmax1),
    "clipped_softmax": Exported(clipped_softmax, CLIP_SETTINGS),
    "clipped_softmax1": Exported(clipped_softmax1, CLIP_SETTINGS),
    "learnable_sink": Exported(learnable_sink, head_param="sink_logit"),
}
GATE_SETTINGS: dict[str, Any] = {"attention_gated": False, "gate_type": "linear", "gate_hidden": 16,
                                 "gate_init_prob": 0.25}
# This project's settings in an exported config.json; a config without them is a plain softmax model.
DEFAULTS: dict[str, Any] = {"attention_variant": "softmax",
                            **{key: default for v in VARIANTS.values() for key, default in v.settings.values()},
                            **GATE_SETTINGS}


def setting(config: Any, name: str) -> Any:
    return getattr(config, name, DEFAULTS[name])


class HeadGate(nn.Module):
    """Gated attention, "conditional per token": head h's gate reads the h-th head_dim slice of the layer
    input and scales that head's context by sigmoid(w_h . x_h + b_h) (`gate_type: mlp` puts a small ReLU
    layer in between). The bias starts at logit(init_prob)."""

    def __init__(self, num_heads: int, head_dim: int, *, gate_type: str, hidden: int, init_prob: float = 0.25,
                 init_std: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.gate_type = num_heads, head_dim, gate_type
        in_dim = head_dim
        if gate_type == "mlp":
            self.hidden_weight = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * init_std)
            self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden))
            in_dim = hidden
        self.weight = nn.Parameter(torch.randn(num_heads, in_dim) * init_std)
        self.bias = nn.Parameter(torch.full((num_heads,), math.log(init_prob / (1.0 - init_prob))))

    def forward(self, x_heads: torch.Tensor) -> torch.Tensor:
        """x_heads: [batch, seq, heads, head_dim] -> gate probabilities [batch, heads, seq, 1]."""
        if self.gate_type == "mlp":
            x_heads = torch.relu(torch.einsum("bthd,hdk->bthk", x_heads, self.hidden_weight) + self.hidden_bias)
        logits = torch.einsum("bthd,hd->bth", x_heads, self.weight) + self.bias
        return torch.sigmoid(logits).permute(0, 2, 1).unsqueeze(-1)


def attach_variant(module: nn.Module, config: Any, num_heads: int, head_dim: int) -> None:
    """Give a transformers attention module the exported variant's settings and parameters (`sink_logit`,
    `gate.*`, named as in the project's checkpoints)."""
    module.variant = setting(config, "attention_variant")
    if module.variant not in VARIANTS:
        raise ValueError(f"unknown attention_variant {module.variant!r} (expected one of {', '.join(VARIANTS)})")
    exported = VARIANTS[module.variant]
    module.variant_settings = {keyword: setting(config, key) for keyword, (key, _) in exported.settings.items()}
    module.sink_logit = nn.Parameter(torch.zeros(num_heads)) if exported.head_param == "sink_logit" else None
    module.gate = (HeadGate(num_heads, head_dim, gate_type=setting(config, "gate_type"),
                            hidden=setting(config, "gate_hidden"), init_prob=setting(config, "gate_init_prob"))
                   if setting(config, "attention_gated") else None)


def init_variant_weights(module: nn.Module, config: Any, init: Any, std: float) -> None:
    """A model's `_init_weights` for the variant's parameters (`init`: transformers' init functions, `std`: the
    config's initialisation std)."""
    if getattr(module, "sink_logit", None) is not None:
        init.zeros_(module.sink_logit)
    elif isinstance(module, HeadGate):
        for param in (module.weight, getattr(module, "hidden_weight", None)):
            if param is not None:
                init.normal_(param, mean=0.0, std=std)
        if getattr(module, "hidden_bias", None) is not None:
            init.zeros_(module.hidden_bias)
        p = setting(config, "gate_init_prob")
        init.constant_(module.bias, math.log(p / (1.0 - p)))


def mask_to_allowed(mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """transformers' attention mask (None, bool or additive float) -> bool "may attend" (None: as given)."""
    if mask is None:
        return None
    mask = mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    allowed: torch.Tensor | None, scaling: float,
                    dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, heads, seq, head_dim] in -> (context [batch, seq, heads, head_dim], probabilities) with the
    variant of `module` (see attach_variant); `allowed`: bool "may attend", None = everywhere."""
    logits = (torch.matmul(query, key.transpose(-1, -2)) * scaling).float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    settings: dict[str, Any] = dict(module.variant_settings)
    if module.sink_logit is not None:
        settings["sink_logit"] = module.sink_logit.view(-1, 1, 1).float()
    probs = VARIANTS[module.variant].probabilities(logits, **settings).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_attention(name: str, function: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make `name` an attn_implementation transformers accepts (boolean masks, None where nothing is masked),
    computed by `function`: a model config naming it is refused by transformers' stock classes, which lack
    the variant's parameters, instead of silently running plain softmax attention. No-op on transformers 4."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers 4: no such registries (use transformers 5)
        return
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
