"""Attention-sink / no-op statistics (outliers/sinks.py) on hand-built attention patterns with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import AttentionConfig, ModelConfig
from model.family import build_model, spec_for
from outliers.report import EvalSettings, summary_keys, evaluate_model, format_table
from outliers.sinks import SinkHooks, first_over_median, head_statistics, summarize_sinks

SEQ, HEADS = 12, 4

SUMMARY_KEYS = summary_keys(spec_for("opt"))  # the OPT runs' headline keys


def uniform_model(variant: str, family: str = "opt", gated: bool = False, sink: float = 0.0) -> torch.nn.Module:
    """Zero query projections: every logit is 0, so each query spreads its mass evenly over what it sees. Zero value
    weights: every value vector is the bias, so all value norms are equal. Gates read nothing: sigmoid(bias)."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=HEADS, ffn_hidden_size=64,
                      max_position_embeddings=SEQ + 2, vocab_size=64, dropout=0.0, init_std=0.1,
                      attention=AttentionConfig(variant=variant, gated=gated, gate_init_prob=0.25))
    model = build_model(cfg, seq_length=SEQ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "q_proj.bias", "v_proj.weight", "gate.weight")):
                param.zero_()
            if name.endswith("v_proj.bias"):
                param.fill_(0.5)
            if name.endswith("sink_logit"):
                param.fill_(sink)
    return model


def test_statistics_of_given_probabilities() -> None:
    probs = torch.zeros(1, 2, 5, 5)
    probs[0, 0, :, 0] = 1.0  # head 0 attends fully to position 0
    probs[0, 1] = torch.full((5, 5), 0.1)  # head 1: 0.1 everywhere, half of its mass goes to nothing
    values = torch.ones(1, 2, 5, 3)
    values[0, 0, 0] = 0.01  # a tiny first value: attending to it is a no-op
    stats = head_statistics(probs, values)
    assert stats["bos_mass"][0].tolist() == pytest.approx([1.0, 0.1])
    assert stats["nothing_mass"][0].tolist() == pytest.approx([0.0, 0.5])
    assert stats["value_norm_ratio"][0].tolist() == pytest.approx([0.01, 1.0])
    x = torch.ones(2, 5, 4)
    x[0, 0] *= 10.0  # norms 20, 2, 2, 2, 2: first over median = 10
    x[1, 2] *= 3.0  # norms 2, 2, 6, 2, 2: 1
    assert first_over_median(x).tolist() == pytest.approx([10.0, 1.0])


@pytest.mark.parametrize("variant, sink", [("softmax", 0.0), ("softmax1", 0.0), ("learnable_sink", 1.5)])
def test_uniform_causal_attention_gives_the_known_masses(variant: str, sink: float) -> None:
    model = uniform_model(variant, sink=sink)
    extra = {"softmax": 0.0, "softmax1": 1.0, "learnable_sink": math.exp(sink)}[variant]  # the implicit key's weight
    # query t sees t + 1 keys of weight 1 and the implicit one: p[t, 0] = 1 / (t + 1 + extra)
    bos = sum(1.0 / (t + 1 + extra) for t in range(1, SEQ)) / (SEQ - 1)
    nothing = sum(extra / (t + 1 + extra) for t in range(SEQ)) / SEQ
    with SinkHooks(model) as hooks:
        model(torch.randint(0, 64, (3, SEQ)))
    layers = hooks.results()
    assert len(layers) == 2
    for layer in layers:
        assert layer["bos_mass"] == pytest.approx([bos] * HEADS, rel=1e-6)
        assert layer["nothing_mass"] == pytest.approx([nothing] * HEADS, rel=1e-5, abs=1e-6)
        assert layer["value_norm_ratio"] == pytest.approx([1.0] * HEADS, rel=1e-6)
        assert layer["sink_head_share"] == (1.0 if bos > 0.3 else 0.0) and layer["gate_mean"] is None
        assert layer["residual_norm_ratio"] > 0
    assert summarize_sinks(layers)["bos_mass_mean"] == pytest.approx(bos, rel=1e-6)


def test_bidirectional_bert_and_gate() -> None:
    model = uniform_model("softmax", family="bert", gated=True)
    with SinkHooks(model) as hooks:
        model(torch.randint(8, 64, (2, SEQ)))
    for layer in hooks.results():  # every query sees all SEQ keys
        assert layer["bos_mass"] == pytest.approx([1.0 / SEQ] * HEADS, rel=1e-6)
        assert layer["gate_mean"] == pytest.approx([0.25] * HEADS, rel=1e-6)
        assert layer["gate_first"] == pytest.approx([0.25] * HEADS, rel=1e-6)


def test_evaluation_reports_sinks_and_statistics_without_position_0() -> None:
    model = uniform_model("softmax1", gated=True)
    val = list(torch.randint(0, 64, (4, SEQ), generator=torch.Generator().manual_seed(1)))
    result = evaluate_model(model, val, None, EvalSettings(micro_batch_size=2, ptq=None)).to_dict()
    assert set(SUMMARY_KEYS) <= set(result) and len(result["sinks"]) == 2
    assert result["gate_mean"] == pytest.approx(0.25, rel=1e-6) and result["nothing_mass_mean"] > 0
    assert result["sink_head_share"] == 0.0  # uniform attention: no head puts > 0.3 on position 0
    module = result["modules"]["decoder.layers.0.fc2"]
    assert {"kurtosis_rest", "inf_norm_rest"} <= set(module) and module["inf_norm_rest"] <= module["inf_norm_max"]
    assert "attention sinks per layer" in format_table(result)
    spiked = model.model if hasattr(model, "model") else model
    with torch.no_grad():  # a huge first position embedding: the first token's residual dwarfs the others
        spiked.decoder.embed_positions.weight[2] += 500.0  # OPT's learned positions are offset by 2
    again = evaluate_model(model, val, None, EvalSettings(micro_batch_size=2, ptq=None)).to_dict()
    assert again["max_residual_norm_ratio"] > 10 * result["max_residual_norm_ratio"]
    assert again["max_inf_norm"] > 100 and again["max_inf_norm_rest"] < again["max_inf_norm"] / 10


def test_tensorboard_gets_per_layer_sink_scalars() -> None:
    from outliers.plots import log_sinks

    model = uniform_model("softmax1", gated=True)
    with SinkHooks(model) as hooks:
        model(torch.randint(0, 64, (2, SEQ)))
    tags: dict[str, float] = {}

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            tags[tag] = value

    log_sinks(Writer(), hooks.results(), step=5)
    for j in (0, 1):
        for key in ("bos_mass_mean", "sink_head_share", "residual_norm_ratio", "value_norm_ratio", "nothing_mass",
                    "gate_mean"):
            assert f"sinks_{key}/layer_{j}" in tags
    assert tags["sinks_gate_mean/layer_1"] == pytest.approx(0.25, rel=1e-6)
    assert len([t for t in tags if t.startswith("sinks_bos_mass_per_head/")]) == 2 * HEADS
