"""The OPT model against Hugging Face transformers, and every attention variant end to end."""

from __future__ import annotations

import pytest
import torch

from model.config import SOFTMAX_VARIANTS, AttentionConfig, ModelConfig
from model.opt import OPTForCausalLM

VOCAB, HIDDEN, HEADS, LAYERS, FFN, MAX_POS = 96, 32, 4, 2, 64, 64


def tiny_config(**attention: object) -> ModelConfig:
    return ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, ffn_hidden_size=FFN,
                       max_position_embeddings=MAX_POS, vocab_size=VOCAB, dropout=0.0, init_std=0.05,
                       attention=AttentionConfig(**attention))  # type: ignore[arg-type]


def hf_copy(model: OPTForCausalLM) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM as HFOPTForCausalLM

    hf_config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=FFN,
                          num_attention_heads=HEADS, max_position_embeddings=MAX_POS, dropout=0.0,
                          attention_dropout=0.0, word_embed_proj_dim=HIDDEN, do_layer_norm_before=True,
                          enable_bias=True, activation_function="relu")
    hf = HFOPTForCausalLM(hf_config).eval()
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    state["lm_head.weight"] = model.decoder.embed_tokens.weight
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_match_transformers_opt(backend: str) -> None:
    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_config(variant="softmax", backend=backend)).eval()
    hf = hf_copy(model)
    ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(ids)
        mask[0, :6] = 0  # left padding: OPT's positions count only real tokens
        mask[1, -4:] = 0
        ours, theirs = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)
        # the loss (shifted labels, padding ignored) equals transformers' as well. Right padding only:
        # from a left-pad position transformers attends uniformly over masked keys, we attend to nothing.
        mask[0, :6] = 1
        labels = ids.masked_fill(mask == 0, -100)
        torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids),
                                   hf(ids, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=1e-5)


def test_lm_head_is_tied_and_positions_have_opt_offset() -> None:
    model = OPTForCausalLM(tiny_config())
    assert model.lm_head_weight is model.decoder.embed_tokens.weight
    assert model.decoder.embed_positions.weight.shape[0] == MAX_POS + 2


@pytest.mark.parametrize("variant", SOFTMAX_VARIANTS)
@pytest.mark.parametrize("gated", [False, True])
def test_every_variant_trains_and_every_parameter_gets_gradient(variant: str, gated: bool) -> None:
    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_config(variant=variant, gated=gated, alpha=4.0))
    ids = torch.randint(0, VOCAB, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(ids, labels=ids)
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = float(loss)
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient for {missing}"
        optimizer.step()
    assert float(loss) < first - 0.5  # memorising one batch must make progress


def test_sdpa_and_eager_models_agree_for_softmax1() -> None:
    torch.manual_seed(0)
    eager = OPTForCausalLM(tiny_config(variant="softmax1", backend="eager", gated=True))
    sdpa = OPTForCausalLM(tiny_config(variant="softmax1", backend="sdpa", gated=True))
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(sdpa(ids, labels=ids), eager(ids, labels=ids), atol=1e-6, rtol=1e-6)


def test_clipped_alpha_sets_gamma_from_sequence_length() -> None:
    model = OPTForCausalLM(tiny_config(variant="clipped_softmax", alpha=12.0), seq_length=48)
    assert model.decoder.layers[0].self_attn.variant_params == {"gamma": -12.0 / 48, "zeta": 1.0}


def test_seq_length_beyond_positions_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        OPTForCausalLM(tiny_config(), seq_length=MAX_POS + 1)


def test_vocab_padding_rounds_up() -> None:
    cfg = tiny_config()
    cfg.pad_vocab_to_multiple_of = 64
    model = OPTForCausalLM(cfg)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == 128
