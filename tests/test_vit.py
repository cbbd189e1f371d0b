"""ViT (model/vit/): timm parity, names, every attention variant non-causal, loss contract, spec pieces."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from model.config import AttentionConfig
from model.family import Batch, spec_for
from model.vit import timm_names
from model.vit.config import ViTConfig
from model.vit.model import VisionTransformer
from model.vit.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
import timm  # noqa: E402

TINY = dict(image_size=16, patch_size=4, num_classes=10, num_layers=2, hidden_size=32, num_heads=4,
            ffn_hidden_size=64)


def tiny(variant: str = "softmax", backend: str = "eager", **extra: object) -> ViTConfig:
    return ViTConfig(**{**TINY, **extra}, attention=AttentionConfig(variant=variant, backend=backend))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_vit_s16_logits_equal_timm_with_the_same_weights(backend: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = VisionTransformer(ViTConfig(attention=AttentionConfig(variant="softmax", backend=backend))).eval()
    ours.load_state_dict(timm_names.from_timm(reference.state_dict()), strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(pixels), ours(pixels)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_every_timm_name_maps_one_to_one_and_back() -> None:
    reference = timm.create_model("vit_small_patch16_224", pretrained=False)
    ours = VisionTransformer(ViTConfig(attention=AttentionConfig(variant="softmax")))
    exported = timm_names.to_timm(ours.state_dict())
    assert set(exported) == set(reference.state_dict())
    assert all(exported[k].shape == v.shape for k, v in reference.state_dict().items())
    back = timm_names.from_timm(exported)
    assert set(back) == set(ours.state_dict()) and all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_a_timm_model_built_from_the_config_loads_a_trained_state_dict() -> None:
    cfg = tiny()
    ours = VisionTransformer(cfg).eval()
    reference = timm.models.vision_transformer.VisionTransformer(**timm_names.timm_kwargs(cfg)).eval()
    reference.load_state_dict(timm_names.to_timm(ours.state_dict()), strict=True)
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours(pixels), reference(pixels), atol=1e-6)


@pytest.mark.parametrize("variant", ["softmax", "softmax1", "clipped_softmax", "clipped_softmax1", "learnable_sink"])
@pytest.mark.parametrize("gated", [False, True])
def test_every_variant_trains_bidirectionally(variant: str, gated: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny(variant)
    cfg.attention.gated = gated
    model = VisionTransformer(cfg)
    assert all(not block.attn.causal for block in model.blocks)
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 9, 1])
    loss = model(pixels, labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Bidirectional: the class token's output depends on the last patch (a causal model's would not).
    with torch.no_grad():
        model.eval()
        changed = pixels.clone()
        changed[:, :, -4:, -4:] += 1.0
        assert not torch.allclose(model(pixels), model(changed))


def test_backends_agree_for_softmax1() -> None:
    torch.manual_seed(0)
    eager = VisionTransformer(tiny("softmax1", "eager")).eval()
    sdpa = VisionTransformer(tiny("softmax1", "sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(eager(pixels), sdpa(pixels), atol=1e-5)


def test_loss_contract_hard_soft_and_smoothing() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(label_smoothing=0.1)).eval()
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 9, 1])
    with torch.no_grad():
        logits = model(pixels)
        assert logits.shape == (4, 10)
        smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        assert torch.allclose(model(pixels, labels=labels), smoothed)
        soft = torch.full((4, 10), 0.01)
        soft[torch.arange(4), labels] = 0.91  # mixup-style targets carry their own smoothing
        expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
        assert torch.allclose(model(pixels, labels=soft), expected, atol=1e-6)


def test_taps_and_outlier_modules_exist_by_name() -> None:
    model = VisionTransformer(tiny())
    spec = spec_for("vit")
    names = dict(model.named_modules())
    for name in spec.outlier_modules(model):
        assert name in names, name
    for j in range(2):
        assert f"blocks.{j}.attn_residual" in names and f"blocks.{j}.ffn_residual" in names
    assert "embed_sum" in names
    kinds = spec.outlier_modules(model)
    assert kinds["blocks.1.mlp.fc2"] == "ffn_out" and kinds["blocks.1"] == "layer_out" and kinds["norm"] == "final_layer_norm"
    from outliers.plots import per_layer_kinds  # one layer's kinds in table order (the heatmap's rows)

    assert per_layer_kinds({name: {"kind": kind} for name, kind in kinds.items()}) == (
        "attn_layer_norm", "attn_out_proj", "ffn_layer_norm", "ffn_out", "layer_out")


def test_eval_sums_give_top1_and_loss() -> None:
    torch.manual_seed(0)
    spec = spec_for("vit")
    model = VisionTransformer(tiny(label_smoothing=0.0)).eval()
    pixels = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        predicted = model(pixels).argmax(-1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 10  # two wrong
    sums = spec.eval_sums(model, Batch(pixels, labels))
    metrics = spec.finish_metrics(sums)
    assert metrics["top1"] == pytest.approx(100 * 4 / 6)
    with torch.no_grad():
        assert metrics["loss"] == pytest.approx(float(model(pixels, labels=labels)), rel=1e-6)


def test_flops_match_the_counted_multiplies() -> None:
    from types import SimpleNamespace

    cfg = tiny()
    flops = spec_for("vit").flops_per_example(SimpleNamespace(model=cfg))
    t, d, f, layers = 17, 32, 64, 2
    matmul = layers * (4 * d * d + 2 * d * f) * t + 3 * 16 * d * 16 + d * 10
    assert flops == 6 * matmul + 12 * layers * d * t * t


@pytest.mark.parametrize("key, value, fragment", [
    ("image_size", 30, "divisible by model.patch_size=4"),
    ("num_heads", 5, "must divide model.hidden_size"),
    ("label_smoothing", 1.0, "[0, 1)"),
])
def test_bad_model_config_is_one_line(key: str, value: object, fragment: str) -> None:
    cfg = tiny(**{key: value})
    with pytest.raises(ConfigError) as error:
        VisionTransformer(cfg)
    assert fragment in str(error.value) and "\n" not in str(error.value) and f"model.{key}" in str(error.value)
