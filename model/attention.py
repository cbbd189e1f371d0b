"""Scaled dot-product attention with a pluggable softmax, and the multi-head attention block.

Variants and the backends that implement them come from the registry (model/variants.py):
  eager  - the reference: materialises the [T, T] probabilities; supports every variant and the gate, and
           is the only path with taps (scores, probabilities, context: model/taps.py) for quantized evaluation.
  sdpa   - torch's fused scaled_dot_product_attention for `softmax` and `softmax1` (model/kernels/sdpa.py).
  triton - fused FlashAttention-style softmax1 / learnable-sink kernels (model/kernels): Triton forward and
           backward, masks supported, no dropout. Runs on CUDA, and on CPU only under TRITON_INTERPRET=1.
  auto   - the fastest valid backend for the case: triton on CUDA when the kernel supports it, else sdpa,
           else eager. Clipped softmax stays eager (its clip breaks the online-softmax rescaling).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.hf_remote.outeffhop_attention import HeadGate
from model import variants
from model.attention_config import AttentionConfig
from model.kernels.sdpa import causal_mask
from model.layers import LocalLayers
from model.taps import Tap

log = logging.getLogger(__name__)

BACKEND_PREFERENCE = ("triton", "sdpa")  # what `auto` tries, fastest first; eager when none fits
_logged_choices: set[tuple[str, str, str]] = set()
_causal_mask = causal_mask  # outliers/sinks.py's name for it


def supported_backends(variant: str, device: torch.device | str | None = None) -> tuple[str, ...]:
    """Backends implementing `variant`. A fused backend is listed only where it can run in this process (triton:
    on CUDA, or on CPU under Triton's interpreter, TRITON_INTERPRET=1); device None means any device here."""
    device_types = ("cuda", "cpu") if device is None else (torch.device(device).type,)
    fused = variants.get(variant).backends
    return ("eager", *(name for name in ("sdpa", "triton")
                       if name in fused and any(fused[name].runnable_on(d) for d in device_types)))


def resolve_backend(backend: str, variant: str, device: torch.device, has_mask: bool = False, *,
                    triton_reason: str | None = None, reasons: Mapping[str, str | None] | None = None) -> str:
    """Map `auto` to a concrete backend and check that an explicit choice supports the variant.

    `reasons`: why a fused backend cannot run this particular case (its Backend.why_not; None = it can);
    `triton_reason` is reasons["triton"]. `auto` picks triton on CUDA when it can, else sdpa, else eager,
    and logs each choice once. Every backend handles `has_mask` (the fused kernel reads bool masks tile by tile)."""
    reasons = {"triton": triton_reason, **(reasons or {})}
    fused = variants.get(variant).backends
    if backend == "auto":
        choice, skipped = "eager", []
        for name in BACKEND_PREFERENCE:
            impl = fused.get(name)
            if impl is None or (impl.auto_on is not None and device.type not in impl.auto_on):
                continue
            reason = reasons.get(name) or impl.unavailable(device.type)
            if reason is None:
                choice = name
                break
            skipped.append(f"{name} skipped: {reason}")
        key = (variant, device.type, choice)
        if key not in _logged_choices:
            _logged_choices.add(key)
            log.info("attention backend auto -> %s (variant=%s, device=%s%s)", choice, variant, device.type,
                     "".join(f"; {s}" for s in skipped))
        return choice
    if backend == "eager":
        return backend
    impl = fused.get(backend)
    if impl is None:
        raise ValueError(f"attention backend {backend!r} does not support variant {variant!r} "
                         f"(supported: {', '.join(supported_backends(variant))})")
    reason = reasons.get(backend) or impl.unavailable(device.type)
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} cannot run this case: {reason}")
    return backend


class AttentionTaps(nn.Module):
    """The named points of the eager path that quantized evaluation intercepts (model/taps.py)."""

    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.scores, self.probs, self.context = Tap(), Tap(), Tap()
        self.gated_context = Tap() if gated else None  # the gated context that enters out_proj


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str, causal: bool,
           attn_mask: torch.Tensor | None, dropout_p: float, scale: float, taps: AttentionTaps | None = None,
           **params: Any) -> torch.Tensor:
    """The reference: probabilities from the registry's eager function. `params`: the variant's keyword
    arguments and per-head tensors ([heads], applied as [heads, 1, 1])."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if taps is not None:  # scores are tapped before masking: -inf has no 8-bit code
        logits = taps.scores(logits)
    allowed = attn_mask
    if causal:
        causal_allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = causal_allowed if allowed is None else allowed & causal_allowed
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    spec = variants.get(variant)
    for head in spec.head_params:
        if isinstance(params.get(head.name), torch.Tensor):
            params[head.name] = params[head.name].view(-1, 1, 1).to(logits.dtype)
    probs = spec.probabilities(logits, **params)
    if taps is not None:
        probs = taps.probs(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    context = torch.matmul(probs, v)
    return taps.context(context) if taps is not None else context


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "softmax1",
                       causal: bool = True, backend: str = "auto", attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0, scale: float | None = None, taps: AttentionTaps | None = None,
                       **params: Any) -> torch.Tensor:
    """Attention over [batch, heads, seq, head_dim] tensors with the named softmax variant.

    attn_mask: optional bool tensor broadcastable to [batch, heads, q_len, k_len], True = may attend.
    params: the variant's keyword arguments (clipped: gamma, zeta) and per-head tensors ([heads]; learnable_sink:
    sink_logit); those of other variants are ignored. taps: the eager path's taps (other backends skip them).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
    spec = variants.get(variant)
    for head in spec.head_params:
        if head.required and params.get(head.name) is None:
            raise ValueError(f"variant {variant!r} needs {head.name} of shape [heads]")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    head_params = {h.name: params[h.name] for h in spec.head_params if params.get(h.name) is not None}
    reasons = {name: impl.why_not(q, k, v, dropout_p=dropout_p, **head_params)
               for name, impl in spec.backends.items()
               if impl.why_not is not None and (backend == name or (backend == "auto" and (
                   impl.auto_on is None or q.device.type in impl.auto_on)))}
    chosen = resolve_backend(backend, variant, q.device, has_mask=attn_mask is not None, reasons=reasons)
    if chosen == "eager":
        return _eager(q, k, v, variant=variant, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                      scale=scale, taps=taps, **params)
    return spec.backends[chosen].run(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                     **head_params)


class MultiHeadAttention(nn.Module):
    """Self-attention (q/k/v/out projections, with biases unless `bias=False`) over this rank's heads; causal (OPT) or not (BERT).

    `layers` builds the projections: plain Linear in one process, megatron-core's
    Column/RowParallelLinear under tensor parallelism, where each rank holds num_heads / tp heads.
    The variant's learned per-head parameters (e.g. `sink_logit`) are attributes named by the registry.
    `force_eager()` makes every forward take the eager path, whose taps quantized evaluation intercepts.
    """

    def __init__(self, hidden_size: int, num_heads: int, attention: AttentionConfig, *, seq_length: int,
                 dropout: float, init_std: float, layers: LocalLayers, causal: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.layers = layers
        self.causal = causal  # decoder (OPT) or bidirectional encoder (BERT)
        self.head_dim = hidden_size // num_heads
        self.num_local_heads = num_heads // layers.tp_size
        self.head_offset = layers.tp_rank * self.num_local_heads
        self.variant, self.backend, self.dropout = attention.variant, attention.backend, dropout
        self.eager_only = False
        self.recompute_core = False  # selective activation recompute (model/recompute.py)
        self.variant_params = attention.variant_params(seq_length)
        self.q_proj = layers.column(hidden_size, hidden_size, bias=bias)
        self.k_proj = layers.column(hidden_size, hidden_size, bias=bias)
        self.v_proj = layers.column(hidden_size, hidden_size, bias=bias)
        self.out_proj = layers.row(hidden_size, hidden_size, bias=bias)
        self.register_parameter("sink_logit", None)  # read by outlier metrics and HF conversion for every variant
        initial = variants.initial_head_params(attention, self.num_local_heads)
        self.head_param_names = tuple(initial)
        for name, value in initial.items():
            setattr(self, name, layers.head_parallel(nn.Parameter(value)))
        self.gate = (HeadGate(self.num_local_heads, self.head_dim, gate_type=attention.gate_type,
                              hidden=attention.gate_hidden, init_prob=attention.gate_init_prob, init_std=init_std)
                     if attention.gated else None)
        if self.gate is not None:
            for param in self.gate.parameters():
                layers.head_parallel(param)
        self.taps = AttentionTaps(gated=attention.gated)

    def force_eager(self, on: bool = True) -> None:
        """Run the eager path (with its taps) whatever the backend: fused backends never materialise scores."""
        self.eager_only = on

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_local_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout if self.training else 0.0
        head_params = {name: getattr(self, name) for name in self.head_param_names}

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Probabilities of this rank's heads: dropout draws from the TP-rank-specific RNG stream.
            with self.layers.model_parallel_rng() if dropout_p > 0 else contextlib.nullcontext():
                return scaled_dot_product(q, k, v, variant=self.variant, causal=self.causal,
                                          backend="eager" if self.eager_only else self.backend, attn_mask=attn_mask,
                                          dropout_p=dropout_p, taps=self.taps, **head_params, **self.variant_params)

        if self.recompute_core:
            from model.recompute import recomputed

            context = recomputed(core, q, k, v, rng_tracker=self.layers.rng_tracker)
        else:
            context = core(q, k, v)
        if self.gate is not None:
            start = self.head_offset * self.head_dim
            x_heads = self.layers.into_parallel_region(x)[..., start:start + self.num_local_heads * self.head_dim]
            x_heads = x_heads.reshape(batch, seq, self.num_local_heads, self.head_dim)
            context = context * self.gate(x_heads)
            if self.taps.gated_context is not None:
                context = self.taps.gated_context(context)
        context = context.transpose(1, 2).reshape(batch, seq, self.num_local_heads * self.head_dim)
        return self.out_proj(context)


__all__ = ["HeadGate", "MultiHeadAttention", "AttentionTaps", "scaled_dot_product", "supported_backends",
           "resolve_backend", "BACKEND_PREFERENCE"]
