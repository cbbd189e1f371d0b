"""softmax1 / learnable-sink attention from torch's fused CPU flash attention and its log-sum-exp.

With S_i = sum_j exp(s_ij) over the keys row i sees and a sink logit b, the sink softmax is the vanilla one
rescaled per row:

    o1_i = o_i * S_i / (S_i + e^b) = o_i * sigmoid(lse_i - b),   lse1_i = logaddexp(lse_i, b).

The backward needs no new kernel: FlashAttention's backward recomputes P = exp(S - lse) from the LSE it is
given and uses delta = rowsum(dO * O), so handing it (o1, lse1) instead of (o, lse) yields exactly the
gradients of the sink softmax (P1 = exp(S - lse1) are its probabilities). The sink's own gradient is
dL/db = -sum_i exp(b - lse1_i) * rowsum(dO_i * o1_i) (see model/kernels/softmax1_triton.py).

Unlike the "extra zero key" formulation this keeps the plain `is_causal` kernel (no [T, T+1]
lower-right mask, which torch materialises on CPU: quadratic memory), so it costs what vanilla SDPA
costs. Used by the `sdpa` backend on CPU for unmasked, dropout-free cases with q_len == k_len when causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
             attn_mask: torch.Tensor | None, dropout_p: float) -> bool:
    return (_FWD is not None and _BWD is not None and q.device.type == "cpu" and attn_mask is None
            and dropout_p == 0.0 and (not causal or q.shape[-2] == k.shape[-2])
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[-2] > 0 and k.shape[-2] > 0)


class _SinkFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, causal, scale):  # type: ignore[override]
        out, lse = _FWD(q, k, v, 0.0, causal, scale=scale)
        # exp(lse - lse1) = sigmoid(lse - b) and lse1 = lse + softplus(b - lse): elementwise [B, H, T] ops that
        # keep the kernel's LSE layout (its backward wants it) and stay below ATen's parallel grain size;
        # the one [B, H, T, D] op rescales the kernel's output in place. (On a busy CPU every extra
        # multi-threaded op costs a thread-pool round trip, milliseconds.)
        x = lse - sink.detach().float().view(1, -1, 1) if sink is not None else lse
        lse1 = lse + F.softplus(-x)
        out1 = out.mul_(torch.sigmoid(x).unsqueeze(-1).to(out.dtype))
        ctx.save_for_backward(q, k, v, out1, lse1, sink)
        ctx.causal, ctx.scale = causal, scale
        return out1

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out1, lse1, sink = ctx.saved_tensors
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        dq, dk, dv = _BWD(dout, q, k, v, out1, lse1, 0.0, ctx.causal, scale=ctx.scale)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = (dout.float() * out1.float()).sum(-1)
            p_sink = torch.exp(sink.detach().float().view(1, -1, 1) - lse1)
            dsink = (-(p_sink * delta).sum(dim=(0, 2))).to(sink.dtype).view_as(sink)
        return dq, dk, dv, dsink, None, None


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                   sink_logit: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, heads, seq, head_dim] attention with a sink logit in the denominator (None: softmax1).
    Callers check `supports` first."""
    return _SinkFlashAttention.apply(q, k, v, sink_logit, causal, scale)
