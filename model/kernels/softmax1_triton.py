"""FlashAttention-2-style fused attention with a sink logit in the softmax denominator (Triton).

    o_i = sum_j p_ij v_j,   p_ij = exp(s_ij - lse_i),   lse_i = log(exp(b_h) + sum_j exp(s_ij)),   s = scale q k^T

b_h = 0 in every head is softmax1 (OutEffHop); a learnable [heads] b is the learnable sink. The sink term is
folded into the online softmax by *starting* each row's running max at b (instead of -inf) and its running
denominator at exp(b - b) = 1; key tiles then update (max, denominator, accumulator) as usual. Two side
effects: a row that sees no key (fully masked, or causal with q_len > k_len) ends with o = 0 and lse = b
(all mass on the sink) instead of NaN, and the running max is never -inf, so no -inf - -inf guard is needed.

Forward (grid: query tiles x batch*heads): one program owns BLOCK_M query rows, streams BLOCK_N-key tiles of
K and V (tiles wholly visible to every row run without masking; the causal diagonal and the ragged last
tile run a masked copy of the loop body), accumulates in fp32 with exp2 (logits pre-scaled by log2 e), and
writes O in the input dtype and the natural-log LSE in fp32. Never materialises T x T.

Backward (FlashAttention-2): delta_i = rowsum(dO_i * O_i) (a small kernel), then
    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q
with one kernel over key tiles (dK, dV; loops over query tiles) and one over query tiles (dQ; loops over key
tiles) so that no atomics are needed and results are deterministic. The sink logit enters only through lse:
d lse_i / d b = exp(b - lse_i) =: p_sink_i and d p_ij / d b = -p_ij p_sink_i, hence
    dL/db_h = -sum_{batch, i} p_sink_i * delta_i,
computed from the saved lse and delta in O(batch * heads * q_len).

Causal masking is lower-right aligned (query i sees keys j <= i + k_len - q_len), as torch's
`causal_lower_right` and the eager reference. An optional bool mask (True = attend), broadcastable to
[batch, heads, q_len, k_len], is read tile by tile through its (possibly zero) strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED and type(tl.zeros).__name__ != "InterpretedFunction":
    # triton.language's own helpers were defined compiled: interpreted kernels would fail on their first call.
    raise ImportError("TRITON_INTERPRET=1 was set after triton was imported (torch imports it): "
                      "set it before `import torch`")
# Triton 3.9's interpreter multiplies the raw uint16 bits of bfloat16 dot operands: upcast them there.
_INTERPRETER_BF16_DOT = tl.constexpr(INTERPRETED)
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of two >= 16) and launch options. Chosen, not autotuned: see `default_blocks`."""

    fwd_m: int = 128
    fwd_n: int = 64
    bwd_m: int = 64
    bwd_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Blocks:
    """Fixed tiles (no autotuning): FlashAttention-2's usual 128 x 64 forward and 64 x 64 backward tiles for
    16-bit inputs; half-size tiles for fp32, whose 4-byte K/V tiles would overflow shared memory (the fp32
    configurations stay under the 163 KB of an A100; checked by compiling for sm_80/sm_90 with ptxas)."""
    if INTERPRETED:  # the interpreter runs one numpy program per tile: large tiles are the fast choice
        return Blocks(fwd_m=64, fwd_n=64, bwd_m=64, bwd_n=64, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return Blocks(fwd_m=64, fwd_n=32, bwd_m=32, bwd_n=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return Blocks(fwd_m=128, fwd_n=64, bwd_m=64, bwd_n=64, num_warps=4, num_stages=3)
    return Blocks(fwd_m=128, fwd_n=64, bwd_m=64, bwd_n=64, num_warps=8, num_stages=2)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b with fp32 accumulation (tensor cores for fp16/bf16; exact fp32 products for fp32 inputs)."""
    if _INTERPRETER_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _tile_mask(offs_m, offs_n, Mask, m_base, smm, smn, TQ, TK, CAUSAL_OFFSET,
               CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which (query, key) pairs of the tile may attend: the user mask, and with BOUNDS the key bounds and the
    causal diagonal. [BLOCK_M, BLOCK_N], or [1, BLOCK_N] (broadcast) for key bounds alone."""
    if HAS_MASK:
        inside = (offs_m[:, None] < TQ) & (offs_n[None, :] < TK)
        user = tl.load(Mask + m_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inside, other=0)
        ok = user != 0
        if BOUNDS and CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
    else:  # called with BOUNDS only
        ok = offs_n[None, :] < TK
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
    return ok


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
               TQ, TK, CAUSAL_OFFSET, qk_scale, lo, hi,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < TK) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        if BOUNDS or HAS_MASK:
            ok = _tile_mask(offs_m, offs_n, Mask, m_base, smm, smn, TQ, TK, CAUSAL_OFFSET, CAUSAL, BOUNDS, HAS_MASK)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at the sink logit
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, TQ, TK, CAUSAL_OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Key tiles [0, full) are visible to every row of the query tile; [full, hi) need masking."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(TK, start_m + BLOCK_M + CAUSAL_OFFSET), 0)
        full = tl.maximum(tl.minimum(TK, start_m + 1 + CAUSAL_OFFSET), 0)
    else:
        hi = TK
        full = TK
    full = (full // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _fwd_kernel(Q, K, V, Sink, Mask, Out, Lse,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb, smh, smm, smn,
                H, TQ, TK, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_SINK: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    CAUSAL_OFFSET = TK - TQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    q_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_ok, other=0.0)
    if HAS_SINK:
        sink = tl.load(Sink + h).to(tl.float32) * 1.4426950408889634  # log2(e): work in base 2
    else:
        sink = 0.0
    m_i = tl.zeros([BLOCK_M], tl.float32) + sink
    l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0  # exp2(sink - m_i) with m_i = sink
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    m_base = b * smb + h * smh
    full, hi = _key_range(start_m, TQ, TK, CAUSAL_OFFSET, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
                               TQ, TK, CAUSAL_OFFSET, qk_scale, 0, full, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL,
                               False, HAS_MASK, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
                               TQ, TK, CAUSAL_OFFSET, qk_scale, full, hi, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL,
                               True, HAS_MASK, DOT_PREC)
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=q_ok)
    tl.store(Lse + bh.to(tl.int64) * TQ + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(Out, DOut, Delta, sob, soh, som, sdb, sdh, sdm, H, TQ,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < TQ) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, Mask, q_base, do_base, stat_base, m_base, offs_n,
                    sqm, sdm, smm, smn, TQ, TK, CAUSAL_OFFSET, qk_scale, lo, hi,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                    BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < TQ
        ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        # Rows past TQ load as zeros (q = dO = 0, lse = delta = 0): their dK, dV contributions vanish.
        q = tl.load(Q + q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(DOut + do_base + offs_m[:, None] * sdm + offs_d[None, :], mask=ok, other=0.0)
        lse = tl.load(Lse + stat_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        if BOUNDS or HAS_MASK:
            allowed = tl.trans(_tile_mask(offs_m, offs_n, Mask, m_base, smm, smn, TQ, TK, CAUSAL_OFFSET,
                                          CAUSAL, BOUNDS, HAS_MASK))
            p_t = tl.where(allowed, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PREC)
        dp_t = _dot(v, tl.trans(do), DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, Mask, DK, DV,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, smb, smh, smm, smn,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, TQ, TK, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    CAUSAL_OFFSET = TK - TQ
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < TK) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_end = tl.cdiv(TQ, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query i sees key j iff j <= i + offset: rows from start_n - offset see part of this key tile,
        # rows from start_n + BLOCK_N - 1 - offset see all of it.
        lo = (tl.maximum(start_n - CAUSAL_OFFSET, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - CAUSAL_OFFSET, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_end)
    else:
        lo = 0
        mid = 0
    q_base = b * sqb + h * sqh
    do_base = b * sdb + h * sdh
    stat_base = bh.to(tl.int64) * TQ
    m_base = b * smb + h * smh
    # Key columns past TK are computed on zero-loaded K, V and never stored.
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, Mask, q_base, do_base, stat_base, m_base, offs_n,
                             sqm, sdm, smm, smn, TQ, TK, CAUSAL_OFFSET, qk_scale, lo, mid,
                             BLOCK_M, BLOCK_D, HEAD_DIM, CAUSAL, True, HAS_MASK, DOT_PREC)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, Mask, q_base, do_base, stat_base, m_base, offs_n,
                             sqm, sdm, smm, smn, TQ, TK, CAUSAL_OFFSET, qk_scale, mid, q_end,
                             BLOCK_M, BLOCK_D, HEAD_DIM, CAUSAL, False, HAS_MASK, DOT_PREC)
    dk = dk * scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_ok)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_ok)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
                  TQ, TK, CAUSAL_OFFSET, qk_scale, lo, hi,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                  BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < TK) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if BOUNDS or HAS_MASK:
            ok = _tile_mask(offs_m, offs_n, Mask, m_base, smm, smn, TQ, TK, CAUSAL_OFFSET, CAUSAL, BOUNDS, HAS_MASK)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, Mask, DQ,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, smb, smh, smm, smn,
                   sdqb, sdqh, sdqm,
                   H, TQ, TK, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    CAUSAL_OFFSET = TK - TQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=ok, other=0.0)
    stat_base = bh.to(tl.int64) * TQ
    lse = tl.load(Lse + stat_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    m_base = b * smb + h * smh
    full, hi = _key_range(start_m, TQ, TK, CAUSAL_OFFSET, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
                       TQ, TK, CAUSAL_OFFSET, qk_scale, 0, full, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, False,
                       HAS_MASK, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, Mask, k_base, v_base, m_base, offs_m, skn, svn, smm, smn,
                       TQ, TK, CAUSAL_OFFSET, qk_scale, full, hi, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, True,
                       HAS_MASK, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=ok)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are free (e.g. a [B, T, H, D] view)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_arg(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int],
              device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    if attn_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), (0, 0, 0, 0)
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    mask = attn_mask.expand(shape).view(torch.uint8)  # broadcast dims get stride 0: nothing is copied
    return mask, tuple(mask.stride())  # type: ignore[return-value]


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: exact fp32 products (tf32 would miss the 1e-4 agreement with the eager reference).
    # fp16/bf16 inputs: None = Triton's default (tensor cores, fp32 accumulation).
    return "ieee" if dtype == torch.float32 else None


class _Softmax1Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, attn_mask, causal, scale, blocks):  # type: ignore[override]
        q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
        batch, heads, q_len, head_dim = q.shape
        k_len = k.shape[2]
        mask, mstride = _mask_arg(attn_mask, (batch, heads, q_len, k_len), q.device)
        # O is laid out [B, T, H, D] and returned as a [B, H, T, D] view: merging heads afterwards is free.
        out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
        sink_arg = sink.detach().float().contiguous() if sink is not None else lse
        block_d = max(16, triton.next_power_of_2(head_dim))
        grid = (triton.cdiv(q_len, blocks.fwd_m), batch * heads)
        if q_len > 0:
            _fwd_kernel[grid](
                q, k, v, sink_arg, mask, out, lse,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mstride,
                heads, q_len, k_len, scale * LOG2E,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, CAUSAL=causal,
                HAS_SINK=sink is not None, HAS_MASK=attn_mask is not None, DOT_PREC=_dot_precision(q.dtype),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        ctx.save_for_backward(q, k, v, out, lse, sink, mask)
        ctx.has_mask, ctx.causal, ctx.scale, ctx.blocks = attn_mask is not None, causal, scale, blocks
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, sink, mask = ctx.saved_tensors
        blocks: Blocks = ctx.blocks
        dout = _rowmajor(dout)
        batch, heads, q_len, head_dim = q.shape
        k_len = k.shape[2]
        mstride = tuple(mask.stride()) if ctx.has_mask else (0, 0, 0, 0)
        block_d = max(16, triton.next_power_of_2(head_dim))
        prec = _dot_precision(q.dtype)
        common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=blocks.num_warps)
        delta = torch.empty_like(lse)
        dq = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        dk = torch.empty(batch, k_len, heads, head_dim, dtype=k.dtype, device=k.device).transpose(1, 2)
        dv = torch.empty(batch, k_len, heads, head_dim, dtype=v.dtype, device=v.device).transpose(1, 2)
        if q_len == 0 or k_len == 0:
            dq.zero_(), dk.zero_(), dv.zero_()
        else:
            _bwd_delta_kernel[(triton.cdiv(q_len, blocks.bwd_m), batch * heads)](
                out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, q_len,
                BLOCK_M=blocks.bwd_m, **common)
            strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *mstride)
            _bwd_dkdv_kernel[(triton.cdiv(k_len, blocks.bwd_n), batch * heads)](
                q, k, v, dout, lse, delta, mask, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
                heads, q_len, k_len, ctx.scale * LOG2E, ctx.scale,
                BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, CAUSAL=ctx.causal, HAS_MASK=ctx.has_mask,
                DOT_PREC=prec, num_stages=blocks.num_stages, **common)
            _bwd_dq_kernel[(triton.cdiv(q_len, blocks.bwd_m), batch * heads)](
                q, k, v, dout, lse, delta, mask, dq, *strides, *dq.stride()[:3],
                heads, q_len, k_len, ctx.scale * LOG2E, ctx.scale,
                BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, CAUSAL=ctx.causal, HAS_MASK=ctx.has_mask,
                DOT_PREC=prec, num_stages=blocks.num_stages, **common)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            if q_len == 0:
                dsink = torch.zeros_like(sink)
            else:
                # dL/db_h = -sum_{batch, rows} p_sink * delta with p_sink = exp(b_h - lse)
                p_sink = torch.exp(sink.detach().float().view(1, -1, 1) - lse)
                dsink = (-(p_sink * delta).sum(dim=(0, 2))).to(sink.dtype).view_as(sink)
        return dq, dk, dv, dsink, None, None, None, None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                       scale: float | None = None, sink_logit: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None,
                       blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention with sink logit (None: softmax1) -> (out [B, H, Tq, D], lse [B, H, Tq] fp32).

    Callers check support first (model.kernels.unsupported_reason)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    blocks = blocks or default_blocks(q.shape[-1], q.dtype)
    sink = sink_logit.reshape(-1) if sink_logit is not None else None
    return _Softmax1Attention.apply(q, k, v, sink, attn_mask, bool(causal), scale, blocks)
