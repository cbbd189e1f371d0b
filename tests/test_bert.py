"""The BERT encoder: bidirectional attention, padding, every variant on every backend, the MLM loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import supported_backends
from model.bert import BertForMaskedLM
from model.config import AttentionConfig, ModelConfig
from common.errors import ConfigError
from model.family import Batch, build_model, family_of

VARIANTS = [dict(variant="softmax"), dict(variant="softmax1"), dict(variant="clipped_softmax"),
            dict(variant="clipped_softmax1"), dict(variant="learnable_sink"), dict(variant="softmax1", gated=True),
            dict(variant="softmax", gated=True, gate_type="mlp")]


def tiny_bert(backend: str = "eager", **attention: object) -> BertForMaskedLM:
    torch.manual_seed(0)
    cfg = ModelConfig(family="bert", num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=24, vocab_size=90, pad_vocab_to_multiple_of=8, init_std=0.05,
                      dropout=0.0, layer_norm_eps=1e-12, attention=AttentionConfig(backend=backend, **attention))
    model = BertForMaskedLM(cfg).eval()
    for module in model.modules():  # a learnable sink away from its zero init, so it matters
        if getattr(module, "sink_logit", None) is not None:
            module.sink_logit.data.uniform_(-1.0, 1.0)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(8, 90, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: "+".join(str(v) for v in a.values()))
def test_every_backend_matches_eager_with_padding(attention: dict) -> None:
    ids, mask = inputs()
    reference = tiny_bert("eager", **attention)(ids, attention_mask=mask)
    backends = [b for b in ("sdpa", "auto") if b == "auto" or b in supported_backends(attention["variant"])]
    for backend in backends:
        model = tiny_bert(backend, **attention)
        got = model(ids, attention_mask=mask)
        real = mask.bool()
        assert torch.allclose(got[real], reference[real], atol=1e-5, rtol=1e-5), backend


def test_attention_is_bidirectional_and_padding_is_invisible() -> None:
    model = tiny_bert(variant="softmax1")
    ids, mask = inputs()
    base = model(ids, attention_mask=mask)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1 - 8) % 82 + 8  # a different token at the end of an unpadded row
    assert not torch.allclose(model(later, attention_mask=mask)[0, 0], base[0, 0])  # the first position sees it
    padded = ids.clone()
    padded[1, 14:] = 3  # change only padded tokens
    real = mask[1].bool()
    assert torch.allclose(model(padded, attention_mask=mask)[1, real], base[1, real], atol=1e-6)


def test_mlm_loss_covers_only_labelled_positions() -> None:
    model = tiny_bert(variant="softmax1")
    ids, mask = inputs()
    labels = torch.full_like(ids, -100)
    labels[0, [2, 9]] = ids[0, [2, 9]]
    labels[1, 3] = ids[1, 3]
    labels[1, 16] = ids[1, 16]  # a padded position: ignored
    logits = model(ids, attention_mask=mask)
    keep = (labels != -100) & mask.bool()
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(model(ids, attention_mask=mask, labels=labels), expected, atol=1e-6)
    family = family_of(model.config)
    assert family.objective.name == "mlm" and family.num_targets(Batch(ids, labels)) == 4


def test_families_build_the_right_model_and_bad_family_is_one_line() -> None:
    cfg = tiny_bert().config
    assert isinstance(build_model(cfg, seq_length=16), BertForMaskedLM)
    batch = torch.stack([torch.stack([torch.arange(5), torch.full((5,), -100)])] * 2)
    inputs_, labels = family_of(cfg).collate(list(batch)).as_tuple()
    assert inputs_.shape == labels.shape == (2, 5)
    with pytest.raises(ConfigError, match="model.family") as info:
        ModelConfig(family="t5").validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.tie_word_embeddings"):
        ModelConfig(family="bert", tie_word_embeddings=False).validate()
