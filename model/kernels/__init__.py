"""Fused attention kernels. Triton is imported lazily: importing this package never imports triton.

`softmax1_attention` is the fused FlashAttention-style softmax1 / learnable-sink attention of
`model/kernels/softmax1_triton.py` (Triton forward and backward). Triton decides when a function is
*defined* whether it is compiled (GPU) or run by its interpreter (`TRITON_INTERPRET=1`, CPU tensors), and
torch imports triton: CPU use needs `TRITON_INTERPRET=1` in the environment before `import torch`. The
kernel module is imported on first use only, so merely importing the model never defines the kernels.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from types import ModuleType

KERNEL_MODULE = "model.kernels.softmax1_triton"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def triton_available() -> bool:
    """True if the triton package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter in this process. Triton fixes that for its own
    language helpers when it is imported, and torch imports triton: TRITON_INTERPRET=1 must be set in the
    environment before `import torch`."""
    module = sys.modules.get(KERNEL_MODULE)
    if module is not None:
        return bool(module.INTERPRETED)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        return False
    language = sys.modules.get("triton.language")
    return language is None or type(language.zeros).__name__ == "InterpretedFunction"


def runnable_on(device_type: str) -> bool:
    """Whether the kernels can run on tensors of this device type in this process."""
    if not triton_available():
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and interpreted()


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                       sink_logit: torch.Tensor | None = None) -> str | None:
    """Why the fused kernel cannot run this case, or None if it can. Masks (bool, broadcastable to
    [batch, heads, q_len, k_len]) are supported; dropout is not."""
    if not triton_available():
        return "triton is not installed"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type!r} is not supported"
    if q.device.type == "cpu" and not interpreted():
        return "CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before importing torch"
    if dropout_p > 0.0:
        return "attention dropout is not implemented in the fused kernel"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"dtype must be one of float32/float16/bfloat16 and equal for q, k, v "
                f"(got {q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[-1] > MAX_HEAD_DIM or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head_dim must be <= {MAX_HEAD_DIM} and equal for q, k, v"
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        return "q, k, v must share batch and heads (and k, v the key length)"
    if sink_logit is not None and sink_logit.numel() != q.shape[1]:
        return f"sink_logit must have one logit per head ({q.shape[1]}), got shape {tuple(sink_logit.shape)}"
    return None


def _module() -> "ModuleType":
    import importlib

    return importlib.import_module(KERNEL_MODULE)


def softmax1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                       scale: float | None = None, sink_logit: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Fused softmax1 (sink_logit None: sink logit 0 in every head) or learnable-sink attention over
    [batch, heads, seq, head_dim] tensors. Differentiable in q, k, v and sink_logit."""
    reason = unsupported_reason(q, k, v, dropout_p=dropout_p, sink_logit=sink_logit)
    if reason is not None:
        raise ValueError(f"attention backend 'triton' cannot run this case: {reason}")
    out, _ = _module().attention_with_lse(q, k, v, causal=causal, scale=scale, sink_logit=sink_logit,
                                          attn_mask=attn_mask)
    return out


def softmax1_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                                scale: float | None = None, sink_logit: torch.Tensor | None = None,
                                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `softmax1_attention`, also returning the log-sum-exp [batch, heads, q_len] (fp32, natural log)
    of each row's logits *including the sink logit* (not differentiable)."""
    reason = unsupported_reason(q, k, v, sink_logit=sink_logit)
    if reason is not None:
        raise ValueError(f"attention backend 'triton' cannot run this case: {reason}")
    return _module().attention_with_lse(q, k, v, causal=causal, scale=scale, sink_logit=sink_logit,
                                        attn_mask=attn_mask)


__all__ = ["softmax1_attention", "softmax1_attention_with_lse", "unsupported_reason", "runnable_on",
           "triton_available", "interpreted"]
