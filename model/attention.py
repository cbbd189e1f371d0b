"""Scaled dot-product attention with a pluggable softmax, and the multi-head attention block.

Backends:
  eager  - the reference: materialises the [T, T] probabilities; supports every variant and the gate.
  sdpa   - torch's fused scaled_dot_product_attention for `softmax` and `softmax1`. softmax1 is exact
           SDPA with one extra key/value of zeros that every query sees: its logit q.0 = 0 contributes
           exp(0) = 1 to the denominator and nothing to the numerator. Never materialises T x T. On CPU
           without mask or dropout it is instead torch's flash kernel rescaled by its log-sum-exp
           (model/kernels/sdpa_sink.py): the zero key would need a lower-right causal mask, which torch
           materialises there as a dense T x (T+1) tensor.
  triton - fused FlashAttention-style softmax1 / learnable-sink kernels (model/kernels): Triton forward and
           backward, masks supported, no dropout. Runs on CUDA, and on CPU only under TRITON_INTERPRET=1.
  auto   - the fastest valid backend for the case: triton on CUDA when the kernel supports it, else sdpa,
           else eager. Clipped softmax stays eager (its clip breaks the online-softmax rescaling).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from model.config import AttentionConfig
from model.kernels import sdpa_sink
from model.layers import LocalLayers
from model.softmax import probabilities

log = logging.getLogger(__name__)

SDPA_VARIANTS = frozenset({"softmax", "softmax1"})
TRITON_VARIANTS = frozenset({"softmax1", "learnable_sink"})
_logged_choices: set[tuple[str, str, str]] = set()


def _triton_kernel() -> Callable[..., torch.Tensor] | None:
    from model import kernels  # never imports triton itself

    return kernels.softmax1_attention if kernels.triton_available() else None


def supported_backends(variant: str, device: torch.device | str | None = None) -> tuple[str, ...]:
    """Backends implementing `variant`. "triton" is listed only where its kernels can run in this process:
    on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1); device None means any device here."""
    from model import kernels

    backends = ["eager"]
    if variant in SDPA_VARIANTS:
        backends.append("sdpa")
    if variant in TRITON_VARIANTS:
        device_types = ("cuda", "cpu") if device is None else (torch.device(device).type,)
        if any(kernels.runnable_on(d) for d in device_types):
            backends.append("triton")
    return tuple(backends)


def resolve_backend(backend: str, variant: str, device: torch.device, has_mask: bool = False, *,
                    triton_reason: str | None = None) -> str:
    """Map `auto` to a concrete backend and check that an explicit choice supports the variant.

    `triton_reason`: why the fused kernel cannot run this particular case (model.kernels.unsupported_reason;
    None = it can). `auto` picks triton on CUDA when it can, else sdpa, else eager, and logs each choice once.
    Every backend handles `has_mask` (the fused kernel reads bool masks tile by tile)."""
    from model import kernels

    if backend == "auto":
        skipped = None
        if device.type == "cuda" and variant in TRITON_VARIANTS:
            skipped = triton_reason or (None if kernels.runnable_on("cuda") else "triton is not installed")
        if device.type == "cuda" and variant in TRITON_VARIANTS and skipped is None:
            choice = "triton"
        elif variant in SDPA_VARIANTS:
            choice = "sdpa"
        else:
            choice = "eager"
        key = (variant, device.type, choice)
        if key not in _logged_choices:
            _logged_choices.add(key)
            log.info("attention backend auto -> %s (variant=%s, device=%s%s)", choice, variant, device.type,
                     f"; triton skipped: {skipped}" if skipped else "")
        return choice
    if backend == "triton" and variant in TRITON_VARIANTS:
        if triton_reason is None and not kernels.runnable_on(device.type):
            triton_reason = ("triton is not installed" if not kernels.triton_available() else
                             f"the kernels cannot run on {device.type!r} here (CPU needs TRITON_INTERPRET=1)")
        if triton_reason is not None:
            raise ValueError(f"attention backend 'triton' cannot run this case: {triton_reason}")
        return backend
    if backend not in supported_backends(variant):
        raise ValueError(f"attention backend {backend!r} does not support variant {variant!r} "
                         f"(supported: {', '.join(supported_backends(variant))})")
    return backend


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    # Lower-right aligned (the last query sees every key), as torch's causal_lower_right.
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str, causal: bool,
           attn_mask: torch.Tensor | None, dropout_p: float, scale: float,
           sink_logit: torch.Tensor | None, gamma: float, zeta: float) -> torch.Tensor:
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = attn_mask
    if causal:
        causal_allowed = _causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = causal_allowed if allowed is None else allowed & causal_allowed
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    sink = sink_logit.view(-1, 1, 1).to(logits.dtype) if sink_logit is not None else None
    probs = probabilities(logits, variant, sink_logit=sink, gamma=gamma, zeta=zeta)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str, causal: bool,
          attn_mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    if variant == "softmax1" and sdpa_sink.supports(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p):
        # CPU: vanilla flash attention rescaled by its LSE (model/kernels/sdpa_sink.py), no T x (T+1) mask.
        return sdpa_sink.sink_attention(q, k, v, causal=causal, scale=scale)
    if variant == "softmax1":
        # Prepend the zero key/value: with lower-right causal alignment every query still sees it.
        zeros = q.new_zeros(*k.shape[:-2], 1, k.shape[-1])
        k = torch.cat([zeros, k], dim=-2)
        v = torch.cat([v.new_zeros(*v.shape[:-2], 1, v.shape[-1]), v], dim=-2)
        if attn_mask is not None:
            pad = attn_mask.new_ones(*attn_mask.shape[:-1], 1)
            attn_mask = torch.cat([pad, attn_mask], dim=-1)
        k_len += 1
    if attn_mask is not None:
        if causal:
            attn_mask = attn_mask & _causal_mask(q_len, k_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if causal and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    mask = causal_lower_right(q_len, k_len) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "softmax1",
                       causal: bool = True, backend: str = "auto", attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0, scale: float | None = None,
                       sink_logit: torch.Tensor | None = None, gamma: float = -0.025,
                       zeta: float = 1.0) -> torch.Tensor:
    """Attention over [batch, heads, seq, head_dim] tensors with the named softmax variant.

    attn_mask: optional bool tensor broadcastable to [batch, heads, q_len, k_len], True = may attend.
    sink_logit: [heads] logits of the implicit "no-op" key (variant `learnable_sink` only).
    gamma, zeta: clipped-softmax stretch parameters (variants `clipped_softmax`, `clipped_softmax1`).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
    if variant == "learnable_sink" and sink_logit is None:
        raise ValueError("variant 'learnable_sink' needs sink_logit of shape [heads]")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    triton_reason = None
    if variant in TRITON_VARIANTS and (backend == "triton" or (backend == "auto" and q.device.type == "cuda")):
        from model.kernels import unsupported_reason

        triton_reason = unsupported_reason(q, k, v, dropout_p=dropout_p, sink_logit=sink_logit)
    chosen = resolve_backend(backend, variant, q.device, has_mask=attn_mask is not None, triton_reason=triton_reason)
    if chosen == "sdpa":
        return _sdpa(q, k, v, variant=variant, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                     scale=scale)
    if chosen == "triton":
        kernel = _triton_kernel()
        assert kernel is not None
        return kernel(q, k, v, causal=causal, scale=scale, sink_logit=sink_logit, attn_mask=attn_mask,
                      dropout_p=dropout_p)
    return _eager(q, k, v, variant=variant, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                  scale=scale, sink_logit=sink_logit, gamma=gamma, zeta=zeta)


class HeadGate(nn.Module):
    """Gated attention, "conditional per token": head h's gate reads the h-th head_dim slice of the
    layer input and scales that head's context by sigmoid(gate). Bias starts at logit(init_prob)."""

    def __init__(self, num_heads: int, head_dim: int, *, gate_type: str, hidden: int, init_prob: float,
                 init_std: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.gate_type = num_heads, head_dim, gate_type
        bias_init = math.log(init_prob / (1.0 - init_prob))
        in_dim = head_dim
        if gate_type == "mlp":
            self.hidden_weight = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * init_std)
            self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden))
            in_dim = hidden
        self.weight = nn.Parameter(torch.randn(num_heads, in_dim) * init_std)
        self.bias = nn.Parameter(torch.full((num_heads,), bias_init))

    def forward(self, x_heads: torch.Tensor) -> torch.Tensor:
        """x_heads: [batch, seq, heads, head_dim] -> gate probabilities [batch, heads, seq, 1]."""
        if self.gate_type == "mlp":
            x_heads = torch.relu(torch.einsum("bthd,hdk->bthk", x_heads, self.hidden_weight) + self.hidden_bias)
        logits = torch.einsum("bthd,hd->bth", x_heads, self.weight) + self.bias
        return torch.sigmoid(logits).permute(0, 2, 1).unsqueeze(-1)


class MultiHeadAttention(nn.Module):
    """Self-attention (q/k/v/out projections with bias) over this rank's heads; causal (OPT) or not (BERT).

    `layers` builds the projections: plain Linear in one process, megatron-core's
    Column/RowParallelLinear under tensor parallelism, where each rank holds num_heads / tp heads.
    """

    def __init__(self, hidden_size: int, num_heads: int, attention: AttentionConfig, *, seq_length: int,
                 dropout: float, init_std: float, layers: LocalLayers, causal: bool = True) -> None:
        super().__init__()
        self.layers = layers
        self.causal = causal  # decoder (OPT) or bidirectional encoder (BERT)
        self.head_dim = hidden_size // num_heads
        self.num_local_heads = num_heads // layers.tp_size
        self.head_offset = layers.tp_rank * self.num_local_heads
        self.variant, self.backend, self.dropout = attention.variant, attention.backend, dropout
        self.variant_params = attention.variant_params(seq_length)
        self.q_proj = layers.column(hidden_size, hidden_size)
        self.k_proj = layers.column(hidden_size, hidden_size)
        self.v_proj = layers.column(hidden_size, hidden_size)
        self.out_proj = layers.row(hidden_size, hidden_size)
        self.sink_logit = (layers.head_parallel(nn.Parameter(torch.zeros(self.num_local_heads)))
                           if attention.variant == "learnable_sink" else None)
        self.gate = (HeadGate(self.num_local_heads, self.head_dim, gate_type=attention.gate_type,
                              hidden=attention.gate_hidden, init_prob=attention.gate_init_prob, init_std=init_std)
                     if attention.gated else None)
        if self.gate is not None:
            for param in self.gate.parameters():
                layers.head_parallel(param)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_local_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout if self.training else 0.0
        # Probabilities of this rank's heads: dropout draws from the TP-rank-specific RNG stream.
        with self.layers.model_parallel_rng() if dropout_p > 0 else contextlib.nullcontext():
            context = scaled_dot_product(q, k, v, variant=self.variant, causal=self.causal, backend=self.backend,
                                         attn_mask=attn_mask, dropout_p=dropout_p, sink_logit=self.sink_logit,
                                         **self.variant_params)
        if self.gate is not None:
            start = self.head_offset * self.head_dim
            x_heads = self.layers.into_parallel_region(x)[..., start:start + self.num_local_heads * self.head_dim]
            x_heads = x_heads.reshape(batch, seq, self.num_local_heads, self.head_dim)
            context = context * self.gate(x_heads)
        context = context.transpose(1, 2).reshape(batch, seq, self.num_local_heads * self.head_dim)
        return self.out_proj(context)
