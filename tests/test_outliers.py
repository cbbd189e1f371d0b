"""Outlier statistics (kurtosis, inf norm, hooks) and W8A8 fake quantization, on tensors and tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from model.config import AttentionConfig, ModelConfig
from model.opt import OPTForCausalLM
from outliers.ptq import (ActQuantizer, PTQSettings, QuantLinear, _tail_value, act_quantizers, calibrate,
                          fake_quant, quantize_w8a8, resolve_settings, set_mode, weight_scale)
from outliers.report import EvalSettings, evaluate_model
from outliers.stats import KURTOSIS_EPS, OutlierHooks, inf_norm, kurtosis, summarize

SEQ = 16


def tiny_opt(variant: str = "softmax1", gated: bool = False, seed: int = 0, **attention: object) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, max_position_embeddings=SEQ,
                      vocab_size=96, dropout=0.0, init_std=0.1,
                      attention=AttentionConfig(variant=variant, gated=gated, **attention))  # type: ignore[arg-type]
    return OPTForCausalLM(cfg, seq_length=SEQ).eval()


def blocks(n: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 96, (n, SEQ), generator=generator))


# ---------------------------------------------------------------- statistics

def test_kurtosis_matches_scipy_pearson_definition() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8) * torch.tensor([1.0, 5.0, 0.2]).view(3, 1, 1)
    x[1, 7, 2] = 400.0  # one outlier
    ours = kurtosis(x).numpy()
    for i in range(3):
        flat = x[i].flatten().double().numpy()
        pearson = scipy.stats.kurtosis(flat, fisher=False)  # biased moments: m4 / m2^2
        m2, s2 = np.var(flat), np.var(flat, ddof=1)  # our denominator: unbiased std^4 + eps
        assert ours[i] == pytest.approx(pearson * m2 ** 2 / (s2 ** 2 + KURTOSIS_EPS), rel=1e-5)
        assert ours[i] == pytest.approx(pearson, rel=3 / flat.size)  # the same number up to ((n-1)/n)^2 and eps
    assert ours[1] > 20 * ours[0]


def test_kurtosis_and_inf_norm_of_known_tensors() -> None:
    n = 1000
    two_point = torch.tensor([1.0, -1.0]).repeat(n // 2).view(1, n)  # Pearson kurtosis exactly 1
    spike = torch.zeros(1, n)
    spike[0, 3] = -7.0  # one spike a among zeros: Pearson kurtosis ((n - 1)^3 + 1) / (n (n - 1))
    # ours divides by the unbiased variance squared (+ eps) instead of the biased m2^2
    assert float(kurtosis(two_point)) == pytest.approx(1.0 / ((n / (n - 1)) ** 2 + KURTOSIS_EPS), rel=1e-6)
    pearson = ((n - 1) ** 3 + 1) / (n * (n - 1))
    m2, s2 = 49.0 * (n - 1) / n ** 2, 49.0 / n
    assert float(kurtosis(spike)) == pytest.approx(pearson * m2 ** 2 / (s2 ** 2 + KURTOSIS_EPS), rel=1e-5)
    assert float(kurtosis(spike)) == pytest.approx(scipy.stats.kurtosis(spike[0].numpy(), fisher=False), rel=3e-3)
    assert float(kurtosis(torch.full((1, 10), 3.0))) == 0.0  # constant: 0 / (0 + eps)
    assert inf_norm(spike).tolist() == [7.0]
    assert inf_norm(torch.tensor([[[1.0, -2.5], [2.0, 0.0]], [[0.5, 0.1], [-0.2, 0.3]]])).tolist() == [2.5, 0.5]


def test_hooks_see_exactly_the_protocol_modules_and_leave_no_trace() -> None:
    model = tiny_opt()
    expected = {f"decoder.layers.{j}.{suffix}" for j in range(2)
                for suffix in ("self_attn.out_proj", "self_attn_layer_norm", "fc2", "final_layer_norm")}
    expected |= {"decoder.layers.0", "decoder.layers.1", "decoder.final_layer_norm"}
    seen: list[str] = []
    with OutlierHooks(model) as hooks:
        handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
                   for name in hooks.stats]  # record which module objects actually fire
        model(torch.stack(blocks(3)))
    for handle in handles:
        handle.remove()
    assert set(hooks.stats) == expected and sorted(seen) == sorted(expected)
    assert not any(m._forward_hooks for m in model.modules())  # OutlierHooks removed its own
    results = hooks.results()
    assert all(r["sequences"] == 3 for r in results.values())
    assert results["decoder.layers.1"]["kind"] == "layer_out" and results["decoder.layers.0.fc2"]["kind"] == "ffn_out"
    kinds = {r["kind"] for r in results.values()}
    assert kinds == {"attn_out_proj", "attn_layer_norm", "ffn_out", "ffn_layer_norm", "layer_out", "final_layer_norm"}
    # the layer's output statistics equal the statistics of the tensor the layer returns
    batch = torch.stack(blocks(3))
    captured = []
    handle = model.decoder.layers[1].register_forward_hook(lambda m, i, o: captured.append(o))
    model(batch)
    handle.remove()
    assert results["decoder.layers.1"]["inf_norm"] == pytest.approx(float(inf_norm(captured[0]).mean()), rel=1e-6)
    summary = summarize(results)
    assert summary["max_inf_norm"] == max(r["inf_norm"] for r in results.values())
    assert summary["layer_max_inf_norm"] == max(results[f"decoder.layers.{j}"]["inf_norm"] for j in range(2))


# ---------------------------------------------------------------- W8A8

def test_exactly_representable_model_is_unchanged_by_w8a8() -> None:
    # Every weight and activation lies on its 8-bit grid: weights are integer multiples of max|w| / 127,
    # activations integer multiples of (max - min) / 255 with min = 0, and all scales are exact floats.
    first = nn.Linear(2, 2, bias=False)
    second = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[127.0, 1.0], [1.0, 127.0]]))  # weight scale 1
        second.weight.copy_(torch.eye(2) * 127 / 128)  # weight scale 1/128
    x = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 0.0]])  # first layer -> [[0,0],[255,129],[127,1]]: scale 1
    fp = nn.Sequential(first, nn.ReLU(), second)  # second layer: 127/128 * that, activation scale 127/128
    expected = fp(x)
    for weight_range in ("minmax", "mse"):
        settings = PTQSettings(weight_range=weight_range, act_percentile=None)
        quantized = nn.Sequential(QuantLinear(first, settings), nn.ReLU(), QuantLinear(second, settings))
        assert torch.equal(quantized[0].weight, first.weight) and torch.equal(quantized[2].weight, second.weight)
        calibrate(quantized, [x])
        assert all(q.mode == "quantize" for q in act_quantizers(quantized))
        assert torch.equal(quantized(x), expected), weight_range


def test_weight_scales_minmax_and_mse() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    assert weight_scale(w, method="minmax") == pytest.approx(float(w.abs().max()) / 127, rel=1e-6)
    w[0, 0] = 60.0  # one huge weight: clipping it lowers the total squared error
    mse, minmax = weight_scale(w, method="mse"), weight_scale(w, method="minmax")
    assert mse < minmax
    fq = lambda s: torch.fake_quantize_per_tensor_affine(w, s, 0, -127, 127)  # noqa: E731
    assert float((fq(mse) - w).square().mean()) < float((fq(minmax) - w).square().mean())


def test_fake_quant_is_torch_fake_quantize_bit_for_bit() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 300, 70) * 5
    x[0, 0, :8] = torch.tensor([0.5, 1.5, -2.5, 1e6, -1e6, 0.0, 127.5, 3.0]) * 0.0625  # ties and far outliers
    for scale, zero_point, low, high in ((0.0625, 128, 0, 255), (0.0317, 17, 0, 255), (0.11, 0, -127, 127),
                                         (1e-3, 255, 0, 255)):
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, low, high)
        assert torch.equal(fake_quant(x, scale, zero_point, low, high), expected), (scale, zero_point)


def test_tail_values_are_exact_order_statistics() -> None:
    torch.manual_seed(0)
    for n, k in ((100_000, 3), (100_000, 2000), (50, 7), (1000, 1000)):
        x = torch.randn(n).round(decimals=2)  # many ties
        ordered = x.sort().values
        assert float(_tail_value(x, k, largest=True)) == float(ordered[-k]), (n, k)
        assert float(_tail_value(x, k, largest=False)) == float(ordered[k - 1]), (n, k)


def test_percentile_observer_clips_the_tails() -> None:
    x = torch.linspace(-1, 1, 100_001)
    x[5] = -500.0
    clipped, plain = ActQuantizer(PTQSettings(act_percentile=99.99)), ActQuantizer(PTQSettings(act_percentile=None))
    for q in (clipped, plain):
        q.mode = "observe"
        q(x)
        q.freeze()
    assert float(plain.observer.min_val) == -500.0
    assert -1.0 <= float(clipped.observer.min_val) < -0.99 and float(clipped.observer.max_val) > 0.99


@pytest.mark.parametrize("variant,gated", [("softmax", False), ("softmax1", False), ("clipped_softmax", False),
                                           ("learnable_sink", False), ("softmax", True)])
def test_quantized_copy_with_quantizers_off_computes_the_same_model(variant: str, gated: bool) -> None:
    model = tiny_opt(variant, gated, alpha=12.0 if variant.startswith("clipped") else None)
    if model.decoder.layers[0].self_attn.sink_logit is not None:
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.self_attn.sink_logit.uniform_(-1, 1)
    batch = torch.stack(blocks(2))
    qmodel = quantize_w8a8(model, PTQSettings(quantize_weights=False))
    torch.testing.assert_close(qmodel(batch), model(batch), rtol=1e-5, atol=1e-5)
    # ... and with W8A8 on, the loss moves only a little for a well-behaved model
    calibrate(qmodel, [torch.stack(blocks(4, seed=2))])
    with torch.no_grad():
        fp_loss, q_loss = float(model(batch, labels=batch)), float(qmodel(batch, labels=batch))
    assert abs(q_loss - fp_loss) < 0.05 * fp_loss


def test_w8a8_never_modifies_the_model_and_ties_lm_head_to_fp32() -> None:
    model = tiny_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = EvalSettings(micro_batch_size=2, calibration_batch_size=2)
    result = evaluate_model(model, blocks(4), blocks(4, seed=3), settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    assert result.values["w8a8_val_ppl"] is not None and result.values["val_ppl"] > 1
    qmodel = quantize_w8a8(model)
    # the LM head reads the fp32 parameter; lookups read the quantized copy
    assert torch.equal(qmodel.lm_head_weight, model.decoder.embed_tokens.weight)
    assert not torch.equal(qmodel.decoder.embed_tokens.qweight, model.decoder.embed_tokens.weight)
    # embedding sum; per layer 6 Linear outputs, 2 LayerNorms, scores, probabilities, context, 2 residual sums;
    # the final LayerNorm
    assert len(act_quantizers(qmodel)) == 1 + 2 * 13 + 1
    # the default weight range ("auto") is OPT's MSE recipe
    assert resolve_settings(model, PTQSettings()).weight_range == "mse"
    mse = quantize_w8a8(model, PTQSettings(weight_range="mse"))
    fc2 = qmodel.decoder.layers[0].fc2.weight
    assert torch.equal(fc2, mse.decoder.layers[0].fc2.weight)


def _w8a8_logit_error(model: OPTForCausalLM) -> float:
    """Squared logit error of the calibrated W8A8 copy, relative to the logits' spread."""
    with torch.no_grad():
        qmodel = calibrate(quantize_w8a8(model, PTQSettings(act_percentile=None)), [torch.stack(blocks(8, seed=4))])
        batch = torch.stack(blocks(4))
        reference = model(batch)
        spread = (reference - reference.mean(-1, keepdim=True)).square().mean()
        return float((qmodel(batch) - reference).square().mean() / spread)


def test_quantization_error_grows_with_an_injected_activation_outlier() -> None:
    model = tiny_opt()
    errors = [_w8a8_logit_error(model)]
    for value in (20.0, 100.0):
        # One value of one activation (layer 0's FFN LayerNorm output, token 0, channel 5) becomes an outlier.
        # The hook sits on the LayerNorm itself, which the quantized copy wraps, so both models see it.
        def spike(_module: nn.Module, _inputs: object, output: torch.Tensor, value: float = value) -> torch.Tensor:
            output = output.clone()
            output[:, 0, 5] += value
            return output
        handle = model.decoder.layers[0].final_layer_norm.register_forward_hook(spike)
        errors.append(_w8a8_logit_error(model))
        handle.remove()
    assert errors[0] < errors[1] < errors[2] and errors[2] > 5 * errors[0], errors


def test_quantizer_modes() -> None:
    q = ActQuantizer(PTQSettings(act_percentile=None))
    x = torch.linspace(-1, 3, 50)
    assert torch.equal(q(x), x)  # off
    set_mode(nn.Sequential(q), "observe")
    assert torch.equal(q(x), x)
    q.freeze()
    q.mode = "quantize"
    assert q.scale == pytest.approx(4 / 255) and not torch.equal(q(x), x)
    assert float((q(x) - x).abs().max()) <= q.scale / 2 + 1e-6
    with pytest.raises(RuntimeError, match="no data"):
        ActQuantizer(PTQSettings()).freeze()
