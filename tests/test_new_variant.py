"""A variant registered in one place (tests/variant_softmax_n.py, named by import path) works through eager
attention, the model and its config, W8A8 evaluation and `launcher.study` (real training subprocesses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from conftest import tiny_overrides
from launcher import study
from launcher.config import config_from_dict
from model.attention import resolve_backend, scaled_dot_product, supported_backends
from model.config import AttentionConfig, ModelConfig
from model.family import family_of
from outliers.ptq import PTQSettings, act_quantizers, calibrate, quantize_w8a8

VARIANT = "tests.variant_softmax_n:SOFTMAX_N"


def _tiny_model(n: float = 2.0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, max_position_embeddings=32,
                      vocab_size=64, dropout=0.0, attention=AttentionConfig(variant=VARIANT, params={"n": n}))
    return family_of(cfg).build(cfg, seq_length=16).eval()


def test_eager_attention_is_the_hand_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) * 2 for _ in range(3))
    out = scaled_dot_product(q, k, v, variant=VARIANT, causal=True, n=2.0)  # backend auto: eager, its only one
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    exp = torch.exp(logits).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), 0.0)
    torch.testing.assert_close(out, exp / (2.0 + exp.sum(-1, keepdim=True)) @ v)
    assert supported_backends(VARIANT) == ("eager",)
    assert resolve_backend("auto", VARIANT, torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="does not support"):
        scaled_dot_product(q, k, v, variant=VARIANT, backend="sdpa")


def test_config_selects_the_variant_and_checks_its_setting() -> None:
    cfg = config_from_dict({"attention": {"variant": VARIANT, "params": {"n": 3}}})
    model = family_of(cfg.model).build(cfg.model, seq_length=32)
    assert model.decoder.layers[0].self_attn.variant_params == {"n": 3}
    assert ModelConfig(attention=AttentionConfig(variant=VARIANT)).attention.variant_params(32) == {"n": 2.0}
    with pytest.raises(ConfigError, match="attention.params.n"):
        config_from_dict({"attention": {"variant": VARIANT, "params": {"n": -1}}})
    with pytest.raises(ConfigError, match="attention.params.m.*not a setting of variant"):
        config_from_dict({"attention": {"variant": VARIANT, "params": {"m": 1}}})
    with pytest.raises(ConfigError, match="attention.variant.*cannot be imported"):
        config_from_dict({"attention": {"variant": "tests.variant_softmax_n:NOPE"}})


def test_model_trains_and_w8a8_quantizes_the_variant() -> None:
    model = _tiny_model()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    loss = model.train()(ids, labels=ids)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval().zero_grad()
    # softmax_n gives each query's "nothing" the mass n / (n + sum exp): larger n, less attention
    assert not torch.equal(_tiny_model(n=5.0)(ids), model(ids))
    qmodel = quantize_w8a8(model, PTQSettings(quantize_weights=False))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), model(ids), rtol=1e-5, atol=1e-5)  # quantizers off: the model
    calibrate(qmodel, [ids[:2], ids[2:]])
    assert len(act_quantizers(qmodel)) == 1 + 2 * 13 + 1  # probabilities tapped like any built-in variant's
    with torch.no_grad():
        fp, q = float(model(ids, labels=ids)), float(qmodel(ids, labels=ids))
    assert q != fp and abs(q - fp) < 0.05 * fp


@pytest.mark.slow
def test_study_trains_and_evaluates_the_variant(data_cache: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    overrides = tiny_overrides(data_cache, tmp_path / "runs", **{
        "train.steps": 3, "eval.interval": 3, "eval.outlier_interval": 3, "eval.max_blocks": 4,
        "eval.calibration_batches": 1, "eval.calibration_batch_size": 4, "train.checkpoint_interval": 100})
    args = ["--config", "configs/opt_tiny.yaml", "--variants", f"softmax1,{VARIANT}", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    assert study.main(args) == 0, capsys.readouterr().err + "".join(
        log.read_text()[-2000:] for log in out.glob("*.log"))
    results = json.loads((out / "study.json").read_text())["variants"]
    assert set(results) == {"softmax1", VARIANT}
    for name, result in results.items():
        assert result["steps"] == 3 and result["val_ppl"] > 1 and result["w8a8_val_ppl"] > 1, name
    assert results["softmax1"]["val_ppl"] != results[VARIANT]["val_ppl"]
    assert f"variant: {VARIANT}" in (out / VARIANT / "config.yaml").read_text()
