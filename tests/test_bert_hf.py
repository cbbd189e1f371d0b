"""BERT and Hugging Face: with softmax our BertForMaskedLM is transformers' BertForMaskedLM (same weights, same
logits and loss), and `launcher.export_hf` writes folders that load as stock BERT (softmax) or with
trust_remote_code (every other variant), giving the project's logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import without_project_prelude

from data_pipeline.tokenizer import Tokenizer
from launcher.config import RunConfig, config_from_dict, save_config
from launcher.export_hf import main as export_main
from launcher.hf_checkpoint import expected_shapes, from_hf, init_state, save_weights_checkpoint, to_hf
from model.bert import BertForMaskedLM
from model.config import AttentionConfig, ModelConfig
from common.errors import ProjectError
from test_export_hf import SEQ, VOCAB, _error, sp_model, wiki_texts  # noqa: F401 (sp_model: the SentencePiece fixture)

transformers = pytest.importorskip("transformers")

SHAPE = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, max_position_embeddings=64,
             init_std=0.1, dropout=0.0, layer_norm_eps=1e-12)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms, biases, sink logits and gate biases too), eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() < 2:
                param.normal_(0.0, 0.5)
    return model.eval()


def padded_batch(vocab: int, batch: int = 3, seq: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, seq - 5:] = 0  # right padding
    mask[2, seq - 1:] = 0
    return ids, mask


@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_softmax_bert_equals_transformers_bert_for_masked_lm(backend: str, hf_attention: str) -> None:
    from transformers import BertConfig, BertForMaskedLM as HFBert

    cfg = ModelConfig(family="bert", vocab_size=100, pad_vocab_to_multiple_of=64, **SHAPE,
                      attention=AttentionConfig(variant="softmax", backend=backend))
    ours = randomize(BertForMaskedLM(cfg))
    hf = HFBert(BertConfig(vocab_size=cfg.padded_vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, attn_implementation=hf_attention))
    state = to_hf(ours.state_dict(), tie_word_embeddings=True, family="bert")
    hf.load_state_dict(state, strict=True)  # every HF name, the tied decoder included, and nothing else
    hf.eval()
    assert from_hf(hf.state_dict(), tie_word_embeddings=True, family="bert").keys() == ours.state_dict().keys()
    ids, mask = padded_batch(cfg.vocab_size)
    types = (torch.arange(ids.shape[1]) >= 8).long().expand_as(ids)  # two segments
    labels = torch.full_like(ids, -100)
    labels[:, 3], labels[0, 7], labels[1, 12] = ids[:, 3], 5, ids[1, 12]  # labelled positions are not padding
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        assert expected.shape[-1] == 128
        torch.testing.assert_close(ours(ids, attention_mask=mask), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids, attention_mask=mask, token_type_ids=types),
                                   hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   atol=1e-5, rtol=1e-5)
        loss = ours(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(loss, hf(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                   atol=1e-5, rtol=1e-5)


def bert_run_config(root: Path, tokenizer: Path | str, **attention: object) -> RunConfig:
    return config_from_dict({
        "model": {"family": "bert", **SHAPE, "vocab_size": VOCAB, "pad_vocab_to_multiple_of": 64},
        "attention": attention,
        "data": {"tokenizer": str(tokenizer), "seq_length": SEQ, "vocab_size": VOCAB},
        "logging": {"run_dir": str(root), "run_name": "run"}})


def weights_checkpoint(cfg: RunConfig, folder: Path, seed: int = 0) -> tuple[BertForMaskedLM, Path]:
    model = randomize(BertForMaskedLM(cfg.model, seq_length=cfg.data.seq_length), seed)
    save_weights_checkpoint(folder, cfg, model.state_dict(), metadata={"source": "test"})
    return model, folder


def export(checkpoint: Path, out: Path) -> Path:
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


VARIANTS = [  # every softmax variant; both gate types; alpha (gamma from seq_length) and explicit gamma/zeta
    {"variant": "softmax"},
    {"variant": "softmax1"},
    {"variant": "clipped_softmax", "alpha": 4.0},
    {"variant": "clipped_softmax1", "gamma": -0.03, "zeta": 1.02},
    {"variant": "learnable_sink"},
    {"variant": "softmax1", "gated": True},
    {"variant": "softmax1", "gated": True, "gate_type": "mlp"},
]


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_bert_export_loads_and_matches_project_logits(attention: dict, sp_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, BertForMaskedLM as HFBert

    cfg = bert_run_config(tmp_path, sp_model, **attention)
    model, ckpt = weights_checkpoint(cfg, tmp_path / "ckpt")
    out = export(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["hidden_act"]) == ("bert", 512, "gelu")
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "OutEffHopBertForMaskedLM"
    ids, mask = padded_batch(VOCAB, seq=SEQ)
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[0, 9] = ids[:, 2], 7
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(ids, attention_mask=mask, labels=labels).loss,
                                   model(ids, attention_mask=mask, labels=labels), atol=1e-5, rtol=1e-5)
        if attention == {"variant": "softmax"}:  # stock transformers, no remote code
            assert config["architectures"] == ["BertForMaskedLM"] and "attn_implementation" not in config
            for stock in (HFBert.from_pretrained(out), AutoModelForMaskedLM.from_pretrained(out)):
                assert type(stock) is HFBert
                torch.testing.assert_close(stock.eval()(ids, attention_mask=mask).logits, expected,
                                           atol=1e-5, rtol=1e-5)
        else:  # stock BERT would compute plain softmax attention with these weights: it must refuse
            assert config["attn_implementation"] == "outeffhop_bert"
            for load in (HFBert.from_pretrained, AutoModelForMaskedLM.from_pretrained):
                with pytest.raises(ValueError):
                    load(out)(ids)


def test_bert_export_tokenizer_names_bert_special_tokens(sp_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    cfg = bert_run_config(tmp_path, sp_model, variant="softmax1")
    out = export(weights_checkpoint(cfg, tmp_path / "ckpt")[1], tmp_path / "hf")
    tokenizer, hf = Tokenizer(sp_model), AutoTokenizer.from_pretrained(out)
    assert len(hf) == tokenizer.vocab_size
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id) == (
        tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id) == (5, 6, 7, 0)
    for text in ["Hello  world.\n  indented", "Café 東京 🙂", *wiki_texts(20, skip=5000)]:
        ids = tokenizer.encode(text)
        # [CLS] text [SEP], as every training example; the same pieces in between
        assert hf(text)["input_ids"] == [5] + ids + [6], text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == tokenizer.decode(ids) == text, text
    # the named tokens take the spaces around them: a masked word looks as in training
    the, of = tokenizer.encode("The"), tokenizer.encode("of")  # ▁The, ▁of
    assert hf("The [MASK] of")["input_ids"] == [5] + the + [7] + of + [6]
    assert hf("[CLS] The [SEP]", add_special_tokens=False)["input_ids"] == [5] + the + [6]


def test_bert_export_loads_without_the_project(sp_model: Path, tmp_path: Path) -> None:
    cfg = bert_run_config(tmp_path, sp_model, variant="learnable_sink", gated=True, gate_type="mlp")
    model, ckpt = weights_checkpoint(cfg, tmp_path / "ckpt", seed=3)
    out = export(ckpt, tmp_path / "hf")
    script = without_project_prelude() + f"""
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
try:  # stock BERT, the remote file not loaded: transformers refuses the unknown attention implementation
    AutoModelForMaskedLM.from_pretrained({str(out)!r})(torch.tensor([[5, 6]]))
    refused = False
except ValueError:
    refused = True
tok = AutoTokenizer.from_pretrained({str(out)!r})
lm = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
batch = tok(["The city of [MASK] is", "A [MASK]"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = lm(**batch).logits
print(json.dumps({{"refused": refused, "ids": batch.input_ids.tolist(), "mask": batch.attention_mask.tolist(),
                  "logits": logits.tolist()}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["refused"]
    ids, mask = torch.tensor(got["ids"]), torch.tensor(got["mask"])
    assert mask[1].sum() < mask.shape[1] and 7 in got["ids"][1]  # padded, and [MASK] is one token
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(got["logits"]), model(ids, attention_mask=mask), atol=1e-5, rtol=1e-5)


def test_bert_init_from_switches_variant_keeping_every_weight(sp_model: Path, tmp_path: Path) -> None:
    """train.init_from a softmax BERT with learnable_sink + gate: shapes from the BERT model, new parameters fresh."""
    source = bert_run_config(tmp_path, sp_model, variant="softmax")
    model, ckpt = weights_checkpoint(source, tmp_path / "ckpt")
    cfg = bert_run_config(tmp_path, sp_model, variant="learnable_sink", gated=True, gate_type="mlp")
    assert "bert.encoder.layer.1.attention.self.gate.hidden_weight" in expected_shapes(cfg)
    state = init_state(ckpt, cfg)
    target = BertForMaskedLM(cfg.model, seq_length=cfg.data.seq_length)
    target.load_state_dict(state, strict=True)
    attention = target.bert.encoder.layer[1].attention.self
    assert torch.equal(attention.sink_logit, torch.zeros(4))
    assert torch.allclose(attention.gate.bias, torch.full((4,), math.log(0.25 / 0.75)))
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_mismatched_bert_checkpoints_fail_with_one_line(sp_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    cfg = bert_run_config(tmp_path, sp_model, variant="softmax1")
    _, ckpt = weights_checkpoint(cfg, tmp_path / "ckpt")
    save_config(bert_run_config(tmp_path, sp_model, variant="learnable_sink"), ckpt / "config.yaml")
    assert "attention.self.sink_logit" in _error(capsys, "--checkpoint", str(ckpt), "--out", out)
    opt = bert_run_config(tmp_path, sp_model, variant="softmax1")
    opt.model.family, opt.model.layer_norm_eps = "opt", 1e-5  # BERT weights, an OPT config
    save_config(opt, ckpt / "config.yaml")
    assert "decoder." in _error(capsys, "--checkpoint", str(ckpt), "--out", out)
    assert not Path(out).exists()
    with pytest.raises(ProjectError, match="decoder.layers.0"):  # OPT weights are not a BERT
        to_hf({"decoder.layers.0.fc1.weight": torch.zeros(1)}, tie_word_embeddings=True, family="bert")
    with pytest.raises(ProjectError, match="model.decoder"):
        from_hf({"model.decoder.embed_tokens.weight": torch.zeros(1)}, tie_word_embeddings=True, family="bert")
