"""The fused softmax1 / learnable-sink Triton kernel against the eager reference.

Triton fixes interpreted-or-compiled when it is imported, and torch imports it: CPU tensors need
TRITON_INTERPRET=1 in the environment before `import torch`, which a pytest process that already imported
torch cannot arrange. So on a CPU machine `test_kernel_suite_under_triton_interpreter` reruns this file in
a child pytest with TRITON_INTERPRET=1, where the kernel tests below run on CPU tensors (in the parent they
are skipped). On a CUDA machine they also run in-process on the GPU with the compiled kernels. Sizes stay
small (T <= 64): the interpreter runs one numpy program per tile.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from model import kernels  # noqa: E402  (never imports the kernel module by itself)
from model.attention import _eager, resolve_backend, scaled_dot_product, supported_backends  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULE = kernels.KERNEL_MODULE
INTERPRETER_PROCESS = type(triton.language.zeros).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRETER_PROCESS else ("cuda" if torch.cuda.is_available() else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="CPU: run by test_kernel_suite_under_triton_interpreter")
parent_only = pytest.mark.skipif(INTERPRETER_PROCESS, reason="checked by the parent pytest process")


@pytest.fixture(scope="module")
def kt():
    module = importlib.import_module(KERNEL_MODULE)
    assert module.INTERPRETED == (DEVICE == "cpu")
    return module


@parent_only
def test_kernel_suite_under_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary


def _inputs(b: int, h: int, t_q: int, t_k: int, d: int, *, sink: bool, mask: bool, seed: int = 0,
            dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, t_q, d, generator=gen) * 1.5).to(DEVICE, dtype).requires_grad_()
    k = (torch.randn(b, h, t_k, d, generator=gen) * 1.5).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(b, h, t_k, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    sink_logit = (torch.randn(h, generator=gen) * 2).to(DEVICE).requires_grad_() if sink else None
    attn_mask = None
    if mask:  # key padding plus one fully masked query row
        attn_mask = (torch.rand(b, 1, 1, t_k, generator=gen) > 0.3).expand(b, 1, t_q, t_k).clone()
        attn_mask[0, :, t_q // 2] = False
        attn_mask = attn_mask.to(DEVICE)
    upstream = torch.randn(b, h, t_q, d, generator=gen).to(DEVICE, dtype)
    return q, k, v, sink_logit, attn_mask, upstream


def _reference(q, k, v, sink_logit, attn_mask, upstream, causal: bool):
    """Float64 eager attention on CPU (model.attention._eager), its gradients, and the LSE including the sink."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    sink = sink_logit.detach().cpu().double().requires_grad_() if sink_logit is not None else None
    attn_mask = attn_mask.cpu() if attn_mask is not None else None
    scale = q.shape[-1] ** -0.5
    out = _eager(*leaves, variant="learnable_sink" if sink is not None else "softmax1", causal=causal,
                 attn_mask=attn_mask, dropout_p=0.0, scale=scale, sink_logit=sink, gamma=0.0, zeta=1.0)
    grads = torch.autograd.grad(out, leaves + ([sink] if sink is not None else []), upstream.cpu().double())
    t_q, t_k = q.shape[-2], k.shape[-2]
    logits = leaves[0].detach() @ leaves[1].detach().transpose(-1, -2) * scale
    allowed = torch.ones(t_q, t_k, dtype=torch.bool)
    allowed = allowed.tril(t_k - t_q) if causal else allowed
    allowed = allowed & attn_mask if attn_mask is not None else allowed
    logits = logits.masked_fill(~allowed, float("-inf"))
    sink_col = sink.detach() if sink is not None else torch.zeros(q.shape[1], dtype=torch.float64)
    sink_col = sink_col.view(1, -1, 1, 1).expand(q.shape[0], -1, t_q, 1)
    lse = torch.logsumexp(torch.cat([logits, sink_col], dim=-1), dim=-1)
    return out.detach(), lse, grads


def _check(kt, q, k, v, sink, mask, upstream, causal, blocks, atol):
    out, lse = kt.attention_with_lse(q, k, v, causal=causal, sink_logit=sink, attn_mask=mask, blocks=blocks)
    grads = torch.autograd.grad(out, [q, k, v] + ([sink] if sink is not None else []), upstream)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, sink, mask, upstream, causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=atol, rtol=0)
    for name, grad, ref in zip(["dq", "dk", "dv", "dsink"], grads, ref_grads):
        torch.testing.assert_close(grad.cpu().double(), ref, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return out.cpu()


SMALL = dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16)
CASES = {
    # name: (b, h, t_q, t_k, d, causal, sink, mask, tiles)  -- ragged lengths leave partial tiles
    "causal-sink-mask-ragged": (2, 2, 37, 37, 16, True, True, True, SMALL),
    "full-softmax1-ragged": (1, 2, 37, 37, 16, False, False, False, SMALL),
    "causal-short-queries": (1, 2, 20, 45, 16, True, True, False, SMALL),  # lower-right alignment
    "causal-long-queries": (1, 2, 45, 20, 16, True, False, False, SMALL),  # first rows see no key: zeros
    "full-sink-mask-rect": (1, 2, 24, 40, 16, False, True, True, SMALL),
    "d64-causal-softmax1": (1, 2, 64, 64, 64, True, False, False, None),  # default tiles
    "d64-full-sink-mixed-tiles": (1, 2, 50, 50, 64, False, True, False,
                                  dict(fwd_m=32, fwd_n=16, bwd_m=16, bwd_n=32)),
    "d128-causal-sink": (1, 1, 40, 40, 128, True, True, False, dict(fwd_m=32, fwd_n=32, bwd_m=32, bwd_n=32)),
    "d8-padded-head-dim": (1, 2, 33, 33, 8, True, True, False, SMALL),
}


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_output_lse_and_gradients_match_eager(kt, name: str) -> None:
    b, h, t_q, t_k, d, causal, sink, mask, tiles = CASES[name]
    q, k, v, sink_logit, attn_mask, upstream = _inputs(b, h, t_q, t_k, d, sink=sink, mask=mask)
    out = _check(kt, q, k, v, sink_logit, attn_mask, upstream, causal,
                 kt.Blocks(**tiles, num_warps=4, num_stages=1) if tiles else None, atol=1e-4)
    if name == "causal-long-queries":  # rows that see no key put all mass on the sink: exactly zero
        assert out[:, :, : t_q - t_k].abs().max() == 0
    if mask:
        assert out[0, :, t_q // 2].abs().max() == 0 and torch.isfinite(out).all()


@needs_kernels
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 6e-2), (torch.float16, 8e-3)])
def test_half_precision_close_to_fp64_reference(kt, dtype: torch.dtype, atol: float) -> None:
    q, k, v, sink, _, upstream = _inputs(1, 2, 64, 64, 64, sink=True, mask=False, dtype=dtype)
    out = _check(kt, q, k, v, sink, None, upstream, True, None, atol=atol)
    assert out.dtype == dtype
    # and no worse than the eager reference computed in the same precision (2x slack for rounding order)
    low = _eager(q, k, v, variant="learnable_sink", causal=True, attn_mask=None, dropout_p=0.0,
                 scale=64 ** -0.5, sink_logit=sink.detach().to(dtype), gamma=0.0, zeta=1.0).cpu()
    ref = _reference(q, k, v, sink, None, upstream, True)[0]
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-3


MATRIX_DTYPES = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 2e-2), "fp16": (torch.float16, 2e-3)}
MATRIX = [(dtype, causal, mask, sink) for dtype in MATRIX_DTYPES for causal in (True, False)
          for mask in (False, True) for sink in (False, True)]
# Under the interpreter fp32 is covered by the CASES above: there the matrix adds the half precisions.
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="fp32 under the interpreter: test_fp32_output_lse_and_gradients")


@needs_kernels
@pytest.mark.parametrize("dtype_name,causal,mask,sink", [
    pytest.param(*case, marks=GPU_ONLY if case[0] == "fp32" else (),
                 id=f"{case[0]}-{'causal' if case[1] else 'full'}-{'mask' if case[2] else 'nomask'}-"
                    f"{'sink' if case[3] else 'softmax1'}") for case in MATRIX])
def test_dtype_causal_mask_matrix_within_twice_the_eager_error(kt, dtype_name: str, causal: bool, mask: bool,
                                                                sink: bool) -> None:
    """Every dtype x causal x mask x variant with the default tiles: output and gradients against the fp64
    reference, at most twice the error of the eager code in the same precision plus a floor. On the GPU at a
    realistic size (ragged T=300, head dim 128 with the sink, 64 without), under the interpreter a small one."""
    dtype, floor = MATRIX_DTYPES[dtype_name]
    b, h, t, d = (2, 4, 300, 128 if sink else 64) if DEVICE == "cuda" else (1, 2, 24, 16)
    q, k, v, sink_logit, attn_mask, upstream = _inputs(b, h, t, t, d, sink=sink, mask=mask, dtype=dtype, seed=11)
    leaves = [q, k, v] + ([sink_logit] if sink else [])
    out, _ = kt.attention_with_lse(q, k, v, causal=causal, sink_logit=sink_logit, attn_mask=attn_mask)
    low = _eager(q, k, v, variant="learnable_sink" if sink else "softmax1", causal=causal, attn_mask=attn_mask,
                 dropout_p=0.0, scale=d ** -0.5, sink_logit=sink_logit, gamma=0.0, zeta=1.0)
    ref_out, _, ref_grads = _reference(q, k, v, sink_logit, attn_mask, upstream, causal)
    kernel = [out, *torch.autograd.grad(out, leaves, upstream)]
    eager = [low, *torch.autograd.grad(low, leaves, upstream)]
    for name, got, same_precision, ref in zip(["out", "dq", "dk", "dv", "dsink"], kernel, eager, [ref_out, *ref_grads]):
        err = (got.detach().cpu().double() - ref).abs().max().item()
        eager_err = (same_precision.detach().cpu().double() - ref).abs().max().item()
        assert got.dtype == same_precision.dtype and torch.isfinite(got).all(), name
        assert err <= 2 * eager_err + floor, f"{name}: max error {err:.3g}, eager in {dtype_name} {eager_err:.3g}"


@needs_kernels
def test_sink_gradient_is_minus_sum_of_sink_probability_times_delta(kt) -> None:
    q, k, v, sink, _, upstream = _inputs(2, 3, 30, 30, 16, sink=True, mask=False, seed=3)
    out, lse = kt.attention_with_lse(q, k, v, causal=True, sink_logit=sink)
    (dsink,) = torch.autograd.grad(out, [sink], upstream)
    delta = (upstream * out.detach()).sum(-1)  # rowsum(dO * O)
    p_sink = torch.exp(sink.detach().view(1, -1, 1) - lse)
    torch.testing.assert_close(dsink, -(p_sink * delta).sum(dim=(0, 2)), atol=1e-5, rtol=1e-5)
    ref = _reference(q, k, v, sink, None, upstream, True)[2][3]
    torch.testing.assert_close(dsink.cpu().double(), ref, atol=1e-5, rtol=0)


@needs_kernels
def test_strided_inputs_and_non_contiguous_upstream(kt) -> None:
    # [B, T, H, D] projections viewed as [B, H, T, D] (what MultiHeadAttention passes), and dO transposed
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 24, 2, 16, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
               for _ in range(3))
    upstream = torch.randn(2, 2, 16, 24, generator=gen).to(DEVICE).transpose(-1, -2)
    _check(kt, q, k, v, None, None, upstream, True, kt.Blocks(**SMALL), atol=1e-4)


@needs_kernels
def test_dispatch_through_scaled_dot_product(kt) -> None:
    q, k, v, sink, mask, upstream = _inputs(2, 2, 19, 19, 16, sink=True, mask=True, seed=7)
    assert "triton" in supported_backends("learnable_sink", DEVICE)
    outs = {}
    for backend in ("eager", "triton"):
        out = scaled_dot_product(q, k, v, variant="learnable_sink", backend=backend, attn_mask=mask, sink_logit=sink)
        outs[backend] = (out, torch.autograd.grad(out, [q, k, v, sink], upstream))
    torch.testing.assert_close(outs["triton"][0], outs["eager"][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(outs["triton"][1], outs["eager"][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # auto never runs the interpreter: on CPU softmax1 goes to sdpa, the learnable sink stays eager
    assert resolve_backend("auto", "softmax1", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", "learnable_sink", torch.device("cpu")) == "eager"


@needs_kernels
@pytest.mark.parametrize("kwargs,match", [
    ({"dropout_p": 0.1}, "dropout"),
    ({"dtype": torch.float64}, "dtype"),
    ({"head_dim": 256}, "head_dim"),
    ({"variant": "clipped_softmax1"}, "does not support variant"),
])
def test_explicit_triton_rejects_unsupported_cases(kwargs: dict, match: str) -> None:
    dtype, d = kwargs.pop("dtype", torch.float32), kwargs.pop("head_dim", 16)
    q = k = v = torch.randn(1, 2, 8, d, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        scaled_dot_product(q, k, v, **{"variant": "softmax1", "backend": "triton", **kwargs})


@needs_kernels
def test_model_trains_identically_with_triton_and_sdpa() -> None:
    from model.config import AttentionConfig, ModelConfig
    from model.opt import OPTForCausalLM

    losses, grads = {}, {}
    for backend in ("sdpa", "triton"):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=64, max_position_embeddings=32,
                          vocab_size=64, dropout=0.0, attention=AttentionConfig(variant="softmax1", backend=backend))
        torch.manual_seed(0)
        model = OPTForCausalLM(cfg).to(DEVICE)
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        keep = torch.ones(2, 24, dtype=torch.long, device=DEVICE)
        keep[1, :5] = 0  # left padding: exercises the kernel's mask path
        loss = model(ids, attention_mask=keep, labels=ids)
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(losses["triton"], losses["sdpa"], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads["triton"], grads["sdpa"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_auto_on_cuda_picks_triton_only_when_the_kernel_supports_the_case(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "runnable_on", lambda device_type: True)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", "softmax1", cuda) == "triton"
    assert resolve_backend("auto", "learnable_sink", cuda, has_mask=True) == "triton"
    assert resolve_backend("auto", "softmax1", cuda, triton_reason="dropout") == "sdpa"
    assert resolve_backend("auto", "learnable_sink", cuda, triton_reason="dropout") == "eager"
    assert resolve_backend("auto", "softmax", cuda) == "sdpa"
    assert resolve_backend("auto", "clipped_softmax1", cuda) == "eager"


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    q = k = v = torch.randn(1, 2, 8, 16)
    assert "triton" not in supported_backends("softmax1", "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        scaled_dot_product(q, k, v, variant="softmax1", backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.softmax1_attention(q, k, v)


LATE_INTERPRETER = f"""
import os, sys, torch
import model.opt, model.attention, model.kernels
assert {KERNEL_MODULE!r} not in sys.modules, "importing the model defined the kernels"
os.environ["TRITON_INTERPRET"] = "1"  # too late: torch already imported triton
from model.attention import scaled_dot_product
x = torch.randn(1, 2, 8, 16)
try:
    scaled_dot_product(x, x, x, variant="softmax1", backend="triton")
except ValueError as err:
    assert "before importing torch" in str(err), err
else:
    raise AssertionError("no error")
print("ok")
"""


@parent_only
def test_model_import_defines_no_kernel_and_a_late_interpreter_flag_is_refused() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False


@parent_only
@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is missing")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """Code generation down to a cubin for sm_90 (no device needed): catches what the interpreter accepts
    but the compiler does not, and checks the default tiles' shared memory (H100: 227 KB per block)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kt = importlib.import_module(KERNEL_MODULE)
    head_dim, dtype = 128, torch.bfloat16
    blocks = kt.default_blocks(head_dim, dtype)
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "DOut": "*bf16", "DQ": "*bf16",
                "DK": "*bf16", "DV": "*bf16", "Sink": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8",
                "qk_scale": "fp32", "scale": "fp32"}
    common = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, CAUSAL=True, HAS_MASK=True, DOT_PREC=None)
    launches = [(kt._fwd_kernel, dict(common, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, HAS_SINK=True)),
                (kt._bwd_dkdv_kernel, dict(common, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n)),
                (kt._bwd_dq_kernel, dict(common, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n))]
    for fn, constexprs in launches:
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
        assert compiled.asm.get("cubin") and 0 < compiled.metadata.shared <= 227 * 1024, fn.__name__
