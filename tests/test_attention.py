"""Every attention backend against the eager reference, and the softmax variants' defining identities."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.attention import HeadGate, resolve_backend, scaled_dot_product, supported_backends
from model.config import SOFTMAX_VARIANTS
from model.softmax import clip_probabilities, softmax, softmax1, softmax_n, softmax_with_sink

B, H, T, D = 2, 3, 9, 8


def _qkv(seed: int = 0, t_q: int = T, t_k: int = T) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, t_q, D), (B, H, t_k, D), (B, H, t_k, D)]
    return [(torch.randn(s, generator=gen) * 2).requires_grad_() for s in shapes]


def _padding_mask() -> torch.Tensor:
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[1, -2:] = False  # right padding
    return keep[:, None, None, :]


def _run(backend: str, variant: str, causal: bool, mask: torch.Tensor | None, seed: int = 0):
    q, k, v = _qkv(seed)
    sink = torch.tensor([0.5, -1.0, 2.0], requires_grad=True) if variant == "learnable_sink" else None
    out = scaled_dot_product(q, k, v, variant=variant, causal=causal, backend=backend, attn_mask=mask,
                             sink_logit=sink, gamma=-0.05, zeta=1.02)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    (out * upstream).sum().backward()
    grads = [q.grad, k.grad, v.grad] + ([sink.grad] if sink is not None else [])
    return out.detach(), grads


CASES = [(backend, variant, causal, masked)
         for variant in SOFTMAX_VARIANTS
         for backend in supported_backends(variant) if backend != "eager"
         for causal, masked in itertools.product([True, False], [False, True])]


@pytest.mark.parametrize("backend,variant,causal,masked", CASES)
def test_backend_matches_eager_reference(backend: str, variant: str, causal: bool, masked: bool) -> None:
    mask = _padding_mask() if masked else None
    ref_out, ref_grads = _run("eager", variant, causal, mask)
    out, grads = _run(backend, variant, causal, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_softmax1_is_covered() -> None:
    # The fused path of the headline variant must exist on every machine (CPU included).
    assert "sdpa" in supported_backends("softmax1")
    assert resolve_backend("auto", "softmax1", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", "clipped_softmax", torch.device("cpu")) == "eager"


def test_softmax1_equals_softmax_with_appended_zero_logit() -> None:
    x = torch.randn(4, 7, dtype=torch.float64) * 5
    appended = torch.cat([x, torch.zeros(4, 1, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(softmax1(x), torch.softmax(appended, dim=-1)[:, :-1])
    torch.testing.assert_close(softmax_n(x, 1.0), softmax1(x))
    # softmax_n adds n * exp(0): n = 3 is softmax with three zero logits appended
    three = torch.cat([x, torch.zeros(4, 3, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(softmax_n(x, 3.0), torch.softmax(three, dim=-1)[:, :-3])


def test_softmax1_is_stable_for_large_logits_and_sums_below_one() -> None:
    x = torch.tensor([[1000.0, 999.0, -1000.0], [-1000.0, -2000.0, -3000.0]])
    p = softmax1(x)
    assert torch.isfinite(p).all()
    assert (p.sum(-1) <= 1).all()
    assert p[1].sum() < 1e-30  # every logit far below the zero "no-op": attend to nothing


def test_fully_masked_rows_give_zeros_in_every_backend() -> None:
    q, k, v = _qkv()
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[:, :, 2, :] = False
    for variant in SOFTMAX_VARIANTS:
        sink = torch.zeros(H) if variant == "learnable_sink" else None
        for backend in supported_backends(variant):
            out = scaled_dot_product(q, k, v, variant=variant, causal=False, backend=backend, attn_mask=mask,
                                     sink_logit=sink)
            assert torch.isfinite(out).all(), (variant, backend)
            assert out[:, :, 2].abs().max() == 0, (variant, backend)


def test_learnable_sink_with_zero_logit_is_softmax1_and_large_logit_silences_head() -> None:
    q, k, v = _qkv()
    out0 = scaled_dot_product(q, k, v, variant="learnable_sink", backend="eager", sink_logit=torch.zeros(H))
    out1 = scaled_dot_product(q, k, v, variant="softmax1", backend="eager")
    torch.testing.assert_close(out0, out1)
    x = torch.randn(5, 6)
    torch.testing.assert_close(softmax_with_sink(x, torch.tensor(0.0)), softmax1(x))
    silent = scaled_dot_product(q, k, v, variant="learnable_sink", backend="eager",
                                sink_logit=torch.tensor([0.0, 0.0, 200.0]))
    assert silent[:, 2].abs().max() < 1e-30


def test_clipped_softmax_reaches_exact_zero_and_one() -> None:
    p = torch.tensor([[0.001, 0.009, 0.99]])
    clipped = clip_probabilities(p, gamma=-0.03, zeta=1.03)
    assert clipped[0, 0] == 0 and clipped[0, 2] == 1
    x = torch.randn(3, 5)
    torch.testing.assert_close(clip_probabilities(softmax(x), gamma=0.0, zeta=1.0), torch.softmax(x, -1))


def test_causal_alignment_for_unequal_lengths_is_lower_right() -> None:
    q, _, _ = _qkv(t_q=3)
    _, k, v = _qkv(seed=1, t_k=T)
    for variant in ("softmax", "softmax1"):
        eager = scaled_dot_product(q, k, v, variant=variant, backend="eager")
        sdpa = scaled_dot_product(q, k, v, variant=variant, backend="sdpa")
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
        # the last query sees all keys: equals non-causal attention for that row
        full = scaled_dot_product(q, k, v, variant=variant, backend="eager", causal=False)
        torch.testing.assert_close(eager[:, :, -1], full[:, :, -1])


def test_gate_starts_at_init_probability() -> None:
    for gate_type in ("linear", "mlp"):
        gate = HeadGate(H, D, gate_type=gate_type, hidden=4, init_prob=0.25, init_std=0.0)
        probs = gate(torch.randn(B, T, H, D))
        assert probs.shape == (B, H, T, 1)
        torch.testing.assert_close(probs, torch.full_like(probs, 0.25))


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "softmax2"}, "unknown softmax variant"),
    ({"variant": "clipped_softmax", "backend": "sdpa"}, "does not support"),
    ({"variant": "learnable_sink"}, "sink_logit"),
])
def test_invalid_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        scaled_dot_product(q, k, v, **{"backend": "eager", **kwargs})


def test_bad_shapes_and_mask_dtype_rejected() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        scaled_dot_product(q[0], k, v)
    with pytest.raises(ValueError, match="bool"):
        scaled_dot_product(q, k, v, attn_mask=torch.ones(T, T))
