"""The variant registry (model/variants.py): the entmax package's normalisers as variants, settings checks,
import paths, and one eager definition shared with the Hugging Face export."""

from __future__ import annotations

import entmax as entmax_package
import pytest
import torch

from common.errors import ConfigError, ProjectError
from model.hf_remote import outeffhop_attention
from model import variants
from model.attention import MultiHeadAttention, scaled_dot_product
from model.config import SOFTMAX_VARIANTS, AttentionConfig
from model.layers import LocalLayers
from model.softmax import entmax, entmax_alpha, sparsemax
from model.variants import probabilities


def _logits(seed: int = 0) -> torch.Tensor:
    logits = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(seed)) * 3
    logits[0, :, 2] = float("-inf")  # a fully masked row
    logits[1, :, :, :2] = float("-inf")  # masked keys
    return logits


def test_sparsemax_and_entmax_are_the_entmax_packages() -> None:
    logits = _logits()
    rows = ~torch.isneginf(logits).all(-1)
    torch.testing.assert_close(sparsemax(logits)[rows], entmax_package.sparsemax(logits[rows], dim=-1))
    alpha_logit = torch.tensor([-1.0, 0.0, 2.0]).view(3, 1, 1)
    alpha = entmax_alpha(alpha_logit).expand(2, 3, 5, 1)
    expected = entmax_package.entmax_bisect(logits[rows], alpha[rows], dim=-1)
    torch.testing.assert_close(entmax(logits, alpha_logit)[rows], expected)
    torch.testing.assert_close(entmax(logits)[rows], entmax_package.entmax_bisect(logits[rows], 1.5, dim=-1))
    for probs in (sparsemax(logits), entmax(logits, alpha_logit)):
        assert probs[0, :, 2].abs().max() == 0 and probs[1, ..., :2].abs().max() == 0
        torch.testing.assert_close(probs[rows].sum(-1), torch.ones(int(rows.sum())))
        assert (probs == 0).any()  # sparse: exact zeros for weak keys


def test_entmax_attention_learns_one_alpha_per_head() -> None:
    attention = AttentionConfig(variant="entmax", entmax_alpha=1.25, backend="auto")
    attn = MultiHeadAttention(16, 4, attention, seq_length=8, dropout=0.0, init_std=0.02, layers=LocalLayers(0.02))
    torch.testing.assert_close(entmax_alpha(attn.alpha_logit), torch.full((4,), 1.25))
    attn(torch.randn(2, 8, 16)).square().sum().backward()
    assert attn.alpha_logit.grad is not None and attn.alpha_logit.grad.abs().sum() > 0
    assert "alpha_logit" in attn.state_dict()
    assert {"sink_logit", "alpha_logit"} <= variants.head_param_names()
    torch.testing.assert_close(variants.initial_head_params(attention, 4)["alpha_logit"], attn.alpha_logit.detach()
                               .new_full((4,), float(torch.logit(torch.tensor(0.25)))))
    with pytest.raises(ConfigError, match="attention.entmax_alpha"):
        AttentionConfig(variant="entmax", entmax_alpha=2.0).validate()


def test_built_in_variants_keep_their_names_and_settings() -> None:
    assert SOFTMAX_VARIANTS[:5] == ("softmax", "softmax1", "clipped_softmax", "clipped_softmax1", "learnable_sink")
    assert {"sparsemax", "entmax"} <= set(SOFTMAX_VARIANTS)
    assert AttentionConfig(variant="clipped_softmax1", alpha=12.0).variant_params(48) == {"gamma": -0.25, "zeta": 1.0}
    assert AttentionConfig(variant="clipped_softmax", gamma=-0.1).variant_params(48) == {"gamma": -0.1, "zeta": 1.0}
    assert AttentionConfig(variant="softmax1").variant_params(48) == {}
    for key, value in (("zeta", 0.5), ("gamma", 0.1), ("alpha", -1.0)):
        with pytest.raises(ConfigError, match=f"attention.{key}"):  # checked whichever variant is chosen
            AttentionConfig(variant="softmax1", **{key: value}).validate()
    with pytest.raises(ConfigError, match="attention.params.n.*not a setting of variant 'softmax1'"):
        AttentionConfig(variant="softmax1", params={"n": 2}).validate()
    with pytest.raises(ConfigError, match="attention.variant.*unknown softmax variant"):
        AttentionConfig(variant="softmax2").validate()
    with pytest.raises(ConfigError, match="does not name a model.variants.Variant"):
        variants.get("model.softmax:softmax_n")


def test_project_and_export_share_one_eager_definition() -> None:
    logits = _logits(1)
    for name, exported in outeffhop_attention.VARIANTS.items():
        assert variants.get(name).eager is exported.probabilities and variants.get(name).exportable
    sink = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(probabilities(logits, "learnable_sink", sink_logit=sink),
                               outeffhop_attention.learnable_sink(logits, sink))
    assert not variants.get("entmax").exportable  # the export file imports only torch


def test_the_export_file_is_each_exported_variants_one_definition() -> None:
    # Registry entries, their defaults and per-head parameters, and the config.json keys of an export (written
    # and read back) all follow from the export file's table: a variant cannot differ between the two.
    for name, exported in outeffhop_attention.VARIANTS.items():
        variant = variants.get(name)
        assert {k: variant.default_settings()[k] for k in exported.settings} == {
            k: default for k, (_, default) in exported.settings.items()}
        assert [h.name for h in variant.head_params] == ([exported.head_param] if exported.head_param else [])
    assert {n for n in variants.names() if variants.get(n).exportable} == set(outeffhop_attention.VARIANTS)
    cfg = AttentionConfig(variant="clipped_softmax1", alpha=12.0, zeta=1.5, gated=True)
    written = variants.export_settings(cfg, seq_length=48)
    assert written["clip_gamma"] == -12.0 / 48 and written["clip_zeta"] == 1.5 and written["attention_gated"]
    assert set(written) == set(outeffhop_attention.DEFAULTS) | {"train_seq_length"}
    read = variants.imported_settings(written)
    assert (read["gamma"], read["zeta"], read["alpha"]) == (-12.0 / 48, 1.5, None)
    with pytest.raises(ProjectError, match="entmax has no Hugging Face export"):
        variants.export_settings(AttentionConfig(variant="entmax"), seq_length=48)


def test_hopfield_separations_come_from_the_registry() -> None:
    from model.hopfield import SEPARATIONS, Hopfield

    assert set(SOFTMAX_VARIANTS) <= set(SEPARATIONS)
    torch.manual_seed(0)
    layer = Hopfield(8, num_heads=2, separation="entmax", beta=4.0)  # a large beta: sparse retrieval
    state = torch.randn(2, 3, 8)
    out, weights = layer(state, torch.randn(2, 5, 8), return_association=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert out.shape == (2, 3, 8) and (weights == 0).any()
    q = torch.randn(1, 2, 4, 8)
    eager = scaled_dot_product(q, q, q, variant="sparsemax", causal=False)
    torch.testing.assert_close(eager, sparsemax(q @ q.transpose(-1, -2) / 8 ** 0.5) @ q)
