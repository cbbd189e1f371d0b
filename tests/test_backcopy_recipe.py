"""The Bigram-Backcopy sink recipe (configs/opt_backcopy_sink.yaml) has Guo et al.'s shapes and optimiser where the
README says it does, and the OPT keys it needs (attention_bias, embedding_init_std, untied head, unsmoothed table)
do what they say."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from common.errors import ConfigError, ProjectError
from data_pipeline.bigram import generate_chain, table_from_counts
from launcher.config import load_config
from launcher.pretrain import build_optimizer, deepspeed_config
from launcher.schedule import lr_at
from model.family import build_model
from model.opt.hf import OPTAdapter

RECIPE = "configs/opt_backcopy_sink.yaml"


@pytest.fixture(scope="module")
def recipe():
    cfg = load_config(RECIPE)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, seq_length=cfg.data.seq_length)


def test_shapes_are_the_papers(recipe) -> None:
    cfg, model = recipe
    m = cfg.model
    assert (m.num_layers, m.num_heads, m.ffn_hidden_size) == (1, 1, 4 * m.hidden_size)  # 1 layer, 1 head, MLP 4d
    assert m.vocab_size == 67 and cfg.data.seq_length == 256 and cfg.data.bos and cfg.data.backcopy_triggers == 3
    assert cfg.data.bigram_smoothing == 0.0 and m.dropout == 0.0
    layer = model.decoder.layers[0]
    assert all(getattr(layer.self_attn, p).bias is None for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert layer.fc1.bias is not None  # the MLP keeps OPT's biases (the README says so)
    assert not m.tie_word_embeddings and model.lm_head_weight is not model.decoder.embed_tokens.weight
    for weight in (model.decoder.embed_tokens.weight, model.decoder.embed_positions.weight):
        assert weight.std().item() == pytest.approx(1.0, abs=0.05)  # nn.Embedding's N(0, 1)
    assert layer.fc1.weight.std().item() == pytest.approx(m.init_std, rel=0.05)
    assert isinstance(layer.self_attn_layer_norm, torch.nn.LayerNorm)  # pre-LN: before attention and MLP


def test_optimiser_is_the_papers(recipe) -> None:
    cfg, model = recipe
    t = cfg.train
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8 and group["weight_decay"] == 1e-4
    assert t.grad_clip == 0.0 and deepspeed_config(cfg, type("W", (), {})(), 1, False)["gradient_clipping"] == 0.0
    lrs = {lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                 schedule=t.lr_schedule) for step in (0, 1, t.steps // 2, t.steps)}
    assert lrs == {t.lr}  # constant: no warmup, no decay


def test_attention_bias_and_embedding_init_keys() -> None:
    cfg = load_config(RECIPE, ["model.attention_bias=true", "model.embedding_init_std=null"]).model
    torch.manual_seed(0)
    model = build_model(cfg, seq_length=16)
    assert model.decoder.layers[0].self_attn.q_proj.bias is not None
    assert model.decoder.embed_tokens.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    for override, key in (("model.embedding_init_std=0", "model.embedding_init_std"),
                          ("model.attention_bias=3", "model.attention_bias")):
        with pytest.raises(ConfigError) as info:
            load_config(RECIPE, [override])
        assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        load_config("configs/bert_tiny.yaml", ["model.attention_bias=false"])
    assert info.value.key == "model.attention_bias"


def test_hugging_face_export_fills_zero_biases(recipe) -> None:
    cfg, model = recipe
    state = model.state_dict()
    adapter = OPTAdapter()
    exported = adapter.to_hf(state, cfg.model)
    bias = exported["model.decoder.layers.0.self_attn.q_proj.bias"]
    assert bias.shape == (cfg.model.hidden_size,) and not bias.count_nonzero()
    assert adapter.from_hf(exported, cfg.model).keys() == state.keys()  # the zeros are dropped again
    exported["model.decoder.layers.0.self_attn.k_proj.bias"] = torch.ones(cfg.model.hidden_size)
    with pytest.raises(ProjectError, match="k_proj.bias"):
        adapter.from_hf(exported, cfg.model)


def test_unsmoothed_table_generates_only_seen_bigrams() -> None:
    counts = np.array([[0, 5, 1], [4, 0, 0], [0, 0, 0]])  # character 2 is never continued
    table = table_from_counts(counts, triggers=1, smoothing=0.0)  # unigram 10, 9, 1: character 0 is the trigger
    assert table.probs[0].tolist() == pytest.approx([0, 5 / 6, 1 / 6]) and table.probs[1].tolist() == [1, 0, 0]
    assert table.probs[2].tolist() == pytest.approx([0, 0.9, 0.1])  # an empty row continues like a start
    assert table.start_distribution().tolist() == pytest.approx([0, 0.9, 0.1])
    chain = generate_chain(table, 300, np.random.default_rng(0))
    seen = {(a, b) for a, b in zip(chain, chain[1:])}
    assert all(counts[a, b] > 0 for a, b in seen if a not in (table.triggers[0], 2)) and (0, 1) in seen
    smoothed = table_from_counts(counts, triggers=1)
    assert (smoothed.probs > 0).all()  # the default +1 reaches every pair


def test_bad_smoothing_names_the_key() -> None:
    cfg = load_config(RECIPE).data
    with pytest.raises(ConfigError) as info:
        replace(cfg, bigram_smoothing=-1.0).validate()
    assert info.value.key == "data.bigram_smoothing"
