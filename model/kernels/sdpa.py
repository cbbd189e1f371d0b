"""The `sdpa` backend: torch's fused scaled_dot_product_attention for `softmax` and `softmax1`.

softmax1 is exact SDPA with one extra key/value of zeros that every query sees: its logit q.0 = 0 adds
exp(0) = 1 to the denominator and nothing to the numerator. On CPU without mask or dropout it is instead
torch's flash kernel rescaled by its log-sum-exp (sdpa_sink.py): the zero key would need a lower-right
causal mask, which torch materialises there as a dense T x (T+1) tensor. Never materialises T x T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from model.kernels import sdpa_sink


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool "may attend" [q_len, k_len], lower-right aligned (the last query sees every key), as torch's
    causal_lower_right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      attn_mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    if attn_mask is not None:
        if causal:
            attn_mask = attn_mask & causal_mask(q_len, k_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if causal and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    mask = causal_lower_right(q_len, k_len) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def softmax1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                       attn_mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    if sdpa_sink.supports(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p):
        # CPU: vanilla flash attention rescaled by its LSE (sdpa_sink.py), no T x (T+1) mask.
        return sdpa_sink.sink_attention(q, k, v, causal=causal, scale=scale)
    # Prepend the zero key/value: with lower-right causal alignment every query still sees it.
    k = torch.cat([k.new_zeros(*k.shape[:-2], 1, k.shape[-1]), k], dim=-2)
    v = torch.cat([v.new_zeros(*v.shape[:-2], 1, v.shape[-1]), v], dim=-2)
    if attn_mask is not None:
        attn_mask = torch.cat([attn_mask.new_ones(*attn_mask.shape[:-1], 1), attn_mask], dim=-1)
    return softmax_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
