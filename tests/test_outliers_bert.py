"""Outlier statistics and W8A8 for BERT (masked LM): the protocol's hooks, the quantized copy, MLM perplexity.

Examples are made by data_pipeline.mlm.Masker from random token blocks with a stand-in tokenizer: no data,
no training.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.mlm import IGNORE_INDEX, Masker, MaskingRule
from model.bert import BertForMaskedLM
from model.config import AttentionConfig, ModelConfig
from model.family import family_of
from outliers.plots import per_layer_grid, tensorboard_tag
from outliers.ptq import (PTQSettings, QuantLinear, act_quantizers, calibrate, quantize_w8a8, quantize_weight,
                          resolve_settings)
from outliers.report import EvalSettings, _capture, block_batches, evaluate_model, family_metrics, format_table
from outliers.stats import OutlierHooks, inf_norm, kurtosis, outlier_modules, summarize

SEQ = 16
VOCAB = 96
LAYERS = 2
TOKENIZER = SimpleNamespace(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, bos_id=-1, eos_id=None,
                            vocab_size=VOCAB)


def tiny_bert(variant: str = "softmax1", gated: bool = False, seed: int = 0, **attention: object) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="bert", num_layers=LAYERS, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=SEQ, vocab_size=VOCAB, dropout=0.0, init_std=0.1,
                      layer_norm_eps=1e-12,
                      attention=AttentionConfig(variant=variant, gated=gated, **attention))  # type: ignore[arg-type]
    model = BertForMaskedLM(cfg, seq_length=SEQ).eval()
    with torch.no_grad():  # BERT initialises LayerNorms to identity and biases to 0: make them matter
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.cls.predictions.bias.uniform_(-0.5, 0.5)
        for layer in model.bert.encoder.layer:
            if layer.attention.self.sink_logit is not None:
                layer.attention.self.sink_logit.uniform_(-1, 1)
    return model


def examples(n: int, seed: int = 1, probability: float = 0.3) -> list[torch.Tensor]:
    """n MLM examples [2, SEQ] (input ids, labels) masked by the project's Masker."""
    generator = torch.Generator().manual_seed(seed)
    masker = Masker(TOKENIZER, MaskingRule(probability=probability), VOCAB)
    return [masker.example(torch.randint(5, VOCAB, (SEQ - 2,), generator=generator), seed, i) for i in range(n)]


def inputs_of(batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(batch)[:, 0]


# ---------------------------------------------------------------- statistics

def test_examples_are_mlm_examples() -> None:
    batch = torch.stack(examples(6))
    ids, labels = family_of(tiny_bert().config).collate(list(batch)).as_tuple()
    assert ids.shape == labels.shape == (6, SEQ)
    masked = labels != IGNORE_INDEX
    assert 0 < int(masked.sum()) < masked.numel() and (ids[:, 0] == TOKENIZER.cls_id).all()
    assert (ids[masked] == TOKENIZER.mask_id).any()


def test_hooks_see_exactly_the_protocol_modules() -> None:
    model = tiny_bert()
    expected = {f"bert.encoder.layer.{j}.{suffix}": kind for j in range(LAYERS)
                for suffix, kind in (("output.dense", "ffn_out"), ("output.LayerNorm:input", "ffn_residual"),
                                     ("output.LayerNorm", "layer_out"))}
    assert outlier_modules(model) == expected
    batch = inputs_of(examples(3))
    # what the hooked activations must be: dense output, dense output + residual (the LN input), LN output
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for j, layer in enumerate(model.bert.encoder.layer):
        for name, module in (("dense", layer.output.dense), ("attention", layer.attention),
                             ("LayerNorm", layer.output.LayerNorm), ("layer", layer)):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=f"{j}.{name}": captured.__setitem__(key, out.detach())))
    with OutlierHooks(model) as hooks:
        model(batch)
    for handle in handles:
        handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind
    results = hooks.results()
    assert set(results) == set(expected) and all(r["sequences"] == 3 for r in results.values())
    for j in range(LAYERS):
        ln_input = captured[f"{j}.dense"] + captured[f"{j}.attention"]  # dropout is off: the residual sum
        assert torch.equal(captured[f"{j}.LayerNorm"], captured[f"{j}.layer"])  # post-LN: LN output = layer output
        for suffix, tensor in (("output.dense", captured[f"{j}.dense"]), ("output.LayerNorm:input", ln_input),
                               ("output.LayerNorm", captured[f"{j}.layer"])):
            stats = results[f"bert.encoder.layer.{j}.{suffix}"]
            assert stats["inf_norm"] == pytest.approx(float(inf_norm(tensor).mean()), rel=1e-6), suffix
            assert stats["kurtosis"] == pytest.approx(float(kurtosis(tensor).mean()), rel=1e-6), suffix
            assert stats["inf_norm_max"] == pytest.approx(float(inf_norm(tensor).max()), rel=1e-6), suffix
    summary = summarize(results)
    assert summary["max_inf_norm"] == max(r["inf_norm"] for r in results.values())
    assert summary["ffn_max_inf_norm"] == max(results[f"bert.encoder.layer.{j}.output.dense"]["inf_norm"]
                                              for j in range(LAYERS))
    assert summary["layer_max_inf_norm"] == max(results[f"bert.encoder.layer.{j}.output.LayerNorm"]["inf_norm"]
                                                for j in range(LAYERS))
    assert summary["avg_kurtosis"] == pytest.approx(sum(r["kurtosis"] for r in results.values()) / len(results))
    # the histogram capture reads an LN input as the statistics do
    ln_input = _capture(model, "bert.encoder.layer.1.output.LayerNorm:input", examples(3))
    assert torch.allclose(ln_input, captured["1.dense"] + captured["1.attention"])


def test_per_layer_grid_table_and_tags_for_bert() -> None:
    model = tiny_bert()
    with OutlierHooks(model) as hooks:
        model(inputs_of(examples(2)))
    modules = hooks.results()
    grid = per_layer_grid(modules, "inf_norm")
    assert len(grid) == 3 and all(len(row) == LAYERS for row in grid)  # ffn_out, ffn_residual, layer_out
    assert grid[1][1] == modules["bert.encoder.layer.1.output.LayerNorm:input"]["inf_norm"]
    tag = tensorboard_tag("bert.encoder.layer.1.output.LayerNorm:input")
    assert tag == "bert.encoder.layer.1.output.LayerNorm_input"
    table = format_table({"modules": modules, **summarize(modules)})
    assert "bert.encoder.layer.0.output.LayerNorm:input" in table and "ffn_residual" in table


# ---------------------------------------------------------------- W8A8

@pytest.mark.parametrize("variant,gated", [("softmax", False), ("softmax1", False), ("clipped_softmax", False),
                                           ("learnable_sink", False), ("softmax", True), ("softmax1", True)])
def test_quantized_copy_with_quantizers_off_computes_the_same_model(variant: str, gated: bool) -> None:
    model = tiny_bert(variant, gated)
    ids, labels = family_of(model.config).collate(examples(3)).as_tuple()
    qmodel = quantize_w8a8(model, PTQSettings(quantize_weights=False))
    assert all(q.mode == "off" for q in act_quantizers(qmodel))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), model(ids), rtol=1e-5, atol=1e-5)
        padding = torch.ones_like(ids)
        padding[0, -5:] = 0  # a key-padding mask reaches the eager quantized attention too
        torch.testing.assert_close(qmodel(ids, attention_mask=padding), model(ids, attention_mask=padding),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qmodel(ids, labels=labels), model(ids, labels=labels), rtol=1e-6, atol=1e-6)
    # ... and with W8A8 on, the MLM loss moves only a little for a well-behaved model
    calibrate(qmodel, block_batches(examples(8, seed=2), 4, family_of(model.config)))
    with torch.no_grad():
        fp_loss, q_loss = float(model(ids, labels=labels)), float(qmodel(ids, labels=labels))
    assert q_loss != fp_loss and abs(q_loss - fp_loss) < 0.05 * fp_loss


def test_protocol_quantization_points_and_fp32_head() -> None:
    model = tiny_bert(gated=True)
    qmodel = quantize_w8a8(model)
    assert resolve_settings(model, PTQSettings()).weight_range == "minmax"  # "auto": BERT's min-max recipe
    # embeddings: sum and LayerNorm output; per layer: q, k, v, out_proj, GELU(intermediate), output.dense,
    # 2 LayerNorm inputs (the residual sums) and outputs, scores, probabilities, context, gated context
    assert len(act_quantizers(qmodel)) == 2 + LAYERS * 14
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == LAYERS * 6  # the MLM head's transform dense is not among them
    layer, qlayer = model.bert.encoder.layer[0], qmodel.bert.encoder.layer[0]
    minmax = PTQSettings(weight_range="minmax")
    assert torch.equal(qlayer.output.dense.weight, quantize_weight(layer.output.dense.weight, minmax))
    intermediate = qlayer.intermediate.dense.weight
    assert torch.equal(intermediate, quantize_weight(layer.intermediate.dense.weight, minmax))
    for name in ("position_embeddings", "token_type_embeddings"):
        weight = getattr(model.bert.embeddings, name).weight
        assert torch.equal(getattr(qmodel.bert.embeddings, name).weight, quantize_weight(weight, minmax)), name
    # the head is fp32: the tied decoder reads the fp32 word embeddings, lookups read the quantized copy
    embeddings = qmodel.bert.embeddings.word_embeddings
    assert torch.equal(qmodel.lm_head_weight, model.lm_head_weight)
    assert torch.equal(embeddings.qweight, quantize_weight(model.lm_head_weight, minmax))
    assert not torch.equal(embeddings.qweight, model.lm_head_weight)
    head, qhead = model.cls.predictions, qmodel.cls.predictions
    assert type(qhead.transform.dense) is torch.nn.Linear and type(qhead.transform.LayerNorm) is torch.nn.LayerNorm
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), qhead.state_dict().values()))
    # the gate's parameters are not quantized
    gate, qgate = layer.attention.self.gate.state_dict(), qlayer.attention.self.gate.state_dict()
    assert gate.keys() == qgate.keys() and all(torch.equal(gate[k], qgate[k]) for k in gate)


def test_w8a8_never_modifies_the_model_and_mlm_ppl_is_close_to_fp() -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = EvalSettings(micro_batch_size=4, calibration_batch_size=4, ptq=PTQSettings(act_percentile=None))
    result = evaluate_model(model, examples(12), examples(8, seed=3), settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    fp, w8a8 = result.values["val_ppl"], result.values["w8a8_val_ppl"]
    assert math.isfinite(fp) and math.isfinite(w8a8) and fp > 1 and w8a8 != fp
    assert abs(result.values["w8a8_val_loss"] - result.values["val_loss"]) < 0.05 * result.values["val_loss"]
    assert result.values["worst_module"] in result.modules and result.worst_activations is not None
    assert len(result.modules) == 3 * LAYERS


def test_mlm_perplexity_counts_only_the_masked_positions() -> None:
    model = tiny_bert()
    batch = examples(7, probability=0.25)
    ids, labels = torch.stack(batch)[:, 0], torch.stack(batch)[:, 1]
    with torch.no_grad():
        logits = model(ids)
    masked = labels != IGNORE_INDEX
    assert masked.sum(dim=1).unique().numel() > 1  # batches of 3 carry different numbers of targets
    expected = float(F.cross_entropy(logits[masked], labels[masked]))  # the mean over every masked token
    result = family_metrics(model, batch, micro_batch_size=3)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    # ... while changing the masked inputs does change it (the model sees the [MASK] tokens)
    unmasked = [torch.stack([torch.where(x[1] == IGNORE_INDEX, x[0], x[1]), x[1]]) for x in batch]
    assert family_metrics(model, unmasked, micro_batch_size=3)["loss"] != pytest.approx(result["loss"], rel=1e-3)
