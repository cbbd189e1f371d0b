"""Task-aware sink statistics of the Bigram-Backcopy task (outliers/backcopy.py) on hand-built attention patterns
and losses with known answers, and their place in the periodic evaluation's result and TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.char_tokenizer import FIRST_CHAR_ID
from model.config import AttentionConfig, ModelConfig
from model.family import BackcopyTask, build_model
from outliers.backcopy import BACKCOPY_KEYS, BackcopyHooks, query_kinds, split_query_sums, task_losses
from outliers.report import EvalSettings, evaluate_model, format_table

SEQ, VOCAB = 12, 67
A, B, T = FIRST_CHAR_ID + 1, FIRST_CHAR_ID + 2, FIRST_CHAR_ID  # two characters and the one trigger
BOS, EOS = 2, 3
# BOS a b T b a b T b a T a: triggers at positions 3, 7, 10, each followed by a copy of the character before it
TOKENS = torch.tensor([[BOS, A, B, T, B, A, B, T, B, A, T, A]])


def test_queries_split_by_their_token() -> None:
    kinds = query_kinds(torch.tensor([[BOS, A, T, EOS, T, B]]), [T], FIRST_CHAR_ID)
    assert kinds["trigger"].tolist() == [[False, False, True, False, True, False]]
    assert kinds["non_trigger"].tolist() == [[False, True, False, False, False, True]]  # BOS and EOS are neither
    per_query = torch.arange(12, dtype=torch.float64).view(1, 2, 6)  # [B, H, T]: head 1 = head 0 + 6
    sums = split_query_sums(per_query, kinds)
    assert sums["trigger"][0].tolist() == [2 + 4, 8 + 10] and sums["trigger"][1].tolist() == [2, 2]
    assert sums["non_trigger"][0].tolist() == [1 + 5, 7 + 11]


def test_a_perfect_copier_has_zero_backcopy_loss() -> None:
    """Logits that put all mass on the copy after every trigger, and spread evenly elsewhere: backcopy loss 0,
    bigram loss log(vocabulary); the EOS target is in neither."""
    tokens = torch.cat([TOKENS, torch.tensor([[EOS]])], dim=1)
    logits = torch.zeros(1, tokens.shape[1] - 1, VOCAB)
    for t in range(1, tokens.shape[1] - 1):
        if tokens[0, t] == T:
            logits[0, t, tokens[0, t - 1]] = 1e4  # the character before the trigger
    losses = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), tokens[:, 1:].reshape(-1),
                                               reduction="none").view(1, -1)
    split = task_losses(losses, tokens, [T], FIRST_CHAR_ID)
    assert split["backcopy"] == (pytest.approx(0.0, abs=1e-6), 3.0)
    # non-trigger character inputs with a character target: positions 1, 2, 4, 5, 6, 8, 9 (11 predicts EOS)
    assert split["bigram"][1] == 7.0 and split["bigram"][0] / 7 == pytest.approx(math.log(VOCAB), rel=1e-6)


def uniform_model(variant: str = "softmax", gated: bool = False, layers: int = 1) -> torch.nn.Module:
    """Zero query projections: each query spreads its mass evenly over what it sees, so p[t, 0] = 1 / (t + 1 + e),
    e the implicit key's weight (softmax 0, softmax1 1). Gates read nothing: sigmoid(bias) = 0.25 everywhere."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=layers, hidden_size=16, num_heads=2, ffn_hidden_size=32, max_position_embeddings=SEQ,
                      vocab_size=VOCAB, dropout=0.0, init_std=0.1, attention_bias=False, tie_word_embeddings=False,
                      embedding_init_std=1.0, attention=AttentionConfig(variant=variant, gated=gated,
                                                                         gate_init_prob=0.25))
    model = build_model(cfg, seq_length=SEQ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "gate.weight")):
                param.zero_()
    return model


@pytest.mark.parametrize("variant, extra", [("softmax", 0.0), ("softmax1", 1.0)])
def test_uniform_attention_gives_the_known_split(variant: str, extra: float) -> None:
    model = uniform_model(variant, gated=True)
    triggers, others = [3, 7, 10], [1, 2, 4, 5, 6, 8, 9, 11]
    with BackcopyHooks(model, [T], FIRST_CHAR_ID) as hooks:
        model(TOKENS)
    (layer,) = hooks.results()
    bos = {kind: sum(1 / (t + 1 + extra) for t in ts) / len(ts) for kind, ts in (("trigger", triggers),
                                                                                 ("non_trigger", others))}
    nothing = {kind: sum(extra / (t + 1 + extra) for t in ts) / len(ts) for kind, ts in (("trigger", triggers),
                                                                                        ("non_trigger", others))}
    for kind in ("trigger", "non_trigger"):
        assert layer[f"bos_mass_{kind}"] == pytest.approx([bos[kind]] * 2, rel=1e-6)
        assert layer[f"nothing_mass_{kind}"] == pytest.approx([nothing[kind]] * 2, rel=1e-5, abs=1e-7)
        assert layer[f"gate_{kind}"] == pytest.approx([0.25] * 2, rel=1e-5)
    hidden = model.decoder.layers[0](model.decoder.embed_tokens(TOKENS) + model.decoder.embed_positions(None, 1, SEQ))
    norms = hidden.detach().double().norm(dim=-1)[0]
    assert layer["bos_residual_norm"] == pytest.approx(float(norms[0]), rel=1e-5)
    assert layer["median_residual_norm"] == pytest.approx(float(norms.median()), rel=1e-5)
    summary = hooks.summary()
    assert set(summary) == set(BACKCOPY_KEYS) and summary["sink_layer"] == 0
    assert summary["bos_mass_non_trigger"] == pytest.approx(bos["non_trigger"], rel=1e-6)
    h = summary["sink_head"]
    assert summary["bos_value_norm_ratio"] == pytest.approx(layer["bos_value_norm"][h] / layer["median_value_norm"][h])


def test_the_sink_head_is_the_one_with_most_non_trigger_bos_mass() -> None:
    """Head 1 (dims 8..15) attends only to BOS: BOS's embedding is one huge feature that its key reads, and the
    head's query is a large constant along that key. The headline follows head 1."""
    model = uniform_model("softmax")
    attn = model.decoder.layers[0].self_attn
    with torch.no_grad():
        model.decoder.embed_tokens.weight[BOS] = 0.0
        model.decoder.embed_tokens.weight[BOS, 0] = 50.0  # after LayerNorm: feature 0 ~ sqrt(15), others ~ N(0, 1)
        attn.k_proj.weight[8:] = 0.0
        attn.k_proj.weight[8, 0] = 1.0
    plain_query = attn.q_proj.forward

    def query(x: torch.Tensor) -> torch.Tensor:
        q = plain_query(x).clone()
        q[..., 8:] = 0.0
        q[..., 8] = 1e3
        return q

    attn.q_proj.forward = query
    with BackcopyHooks(model, [T], FIRST_CHAR_ID) as hooks:
        model(TOKENS)
    (layer,) = hooks.results()
    assert layer["bos_mass_non_trigger"][1] > 0.99 and layer["bos_mass_trigger"][1] > 0.99
    assert layer["bos_mass_non_trigger"][0] < 0.5
    summary = hooks.summary()
    assert (summary["sink_layer"], summary["sink_head"]) == (0, 1) and summary["bos_mass_non_trigger"] > 0.99


def test_hooked_losses_add_up_to_the_model_loss() -> None:
    model = uniform_model("softmax1", layers=2)
    tokens = torch.cat([TOKENS, torch.tensor([[EOS]])], dim=1)[:, :SEQ]
    with BackcopyHooks(model, [T], FIRST_CHAR_ID) as hooks, torch.no_grad():
        logits = model(tokens)
    losses = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="none").double()
    summary = hooks.summary()
    assert summary["backcopy_loss"] == pytest.approx(float(losses[[3, 7, 10]].mean()), rel=1e-5)
    assert len(hooks.results()) == 2 and summary["gate_non_trigger"] is None
    assert summary["bigram_loss"] == pytest.approx(float(losses[[1, 2, 4, 5, 6, 8, 9]].mean()), rel=1e-5)


def test_evaluation_result_and_tensorboard_carry_the_task_numbers() -> None:
    from outliers.plots import log_backcopy

    model = uniform_model("softmax")
    blocks = [TOKENS[0]] * 3
    result = evaluate_model(model, blocks, None, EvalSettings(micro_batch_size=2, ptq=None, backcopy=BackcopyTask((T,), FIRST_CHAR_ID))).to_dict()
    assert set(BACKCOPY_KEYS) <= set(result) and result["backcopy"][0]["layer"] == 0
    assert "bigram-backcopy sinks per layer and head" in format_table(result)
    plain = evaluate_model(model, blocks, None, EvalSettings(micro_batch_size=2, ptq=None)).to_dict()
    assert "backcopy" not in plain and "bos_mass_non_trigger" not in plain

    class Writer:
        def __init__(self) -> None:
            self.scalars: dict[str, float] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars[tag] = value

    writer = Writer()
    log_backcopy(writer, result, 5)  # what log_tensorboard adds for a bigram_backcopy run
    assert writer.scalars["backcopy/bos_mass_non_trigger"] == result["bos_mass_non_trigger"]
    assert "backcopy_bos_mass_trigger/layer_0_head_1" in writer.scalars
    assert "backcopy_bos_residual_norm/layer_0" in writer.scalars
