"""Hugging Face import: published-OPT-style folders become checkpoints that pretraining continues from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, train_losses
from data_pipeline.tokenizer import open_tokenizer
from launcher.config import load_config
from launcher.export_hf import main as export_main
from launcher.hf_checkpoint import init_state
from launcher.import_hf import main as import_main
from model.opt import OPTForCausalLM
from test_export_hf import hf_perplexity, wiki_texts

transformers = pytest.importorskip("transformers")

OPT_SHAPE = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                 word_embed_proj_dim=32)


def save_opt(folder: Path, vocab_size: int = 416, **config: object) -> Path:
    """A random transformers OPTForCausalLM (every parameter random) saved as from_pretrained expects."""
    from transformers import OPTConfig, OPTForCausalLM as HFOPT

    torch.manual_seed(0)
    settings = {**OPT_SHAPE, "vocab_size": vocab_size, "dropout": 0.0, "pad_token_id": 1, "bos_token_id": 2,
                "eos_token_id": 2, **config}
    model = HFOPT(OPTConfig(**settings))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5 if param.dim() < 2 else 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like a downloaded facebook/opt-*: OPT weights + a byte-level BPE tokenizer with OPT's special tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("opt-tiny")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(wiki_texts(300), vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                            show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)
    return save_opt(folder)


def test_round_trip_import_then_export_gives_identical_weights_and_logits(opt_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, OPTForCausalLM as HFOPT

    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert import_main(["--model", str(opt_folder), "--out", str(ckpt), "--config", "configs/opt_tiny.yaml"]) == 0
    cfg = load_config(ckpt / "config.yaml")
    assert (cfg.attention.variant, cfg.model.hidden_size, cfg.model.vocab_size) == ("softmax", 32, 416)
    assert cfg.data.tokenizer == f"hf:{ckpt / 'tokenizer'}" and cfg.train.init_from == str(ckpt)
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    original, exported = load_file(opt_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    ids = torch.randint(0, 416, (2, 24))
    with torch.no_grad():
        assert torch.equal(HFOPT.from_pretrained(out)(ids).logits, HFOPT.from_pretrained(opt_folder)(ids).logits)
    text = "Round trip:\n  café 東京 🙂"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(opt_folder)(text).input_ids


def test_import_switches_variant_keeping_every_weight(opt_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ckpt = tmp_path / "sink"
    assert import_main(["--model", str(opt_folder), "--out", str(ckpt), "--config", "configs/opt_tiny.yaml",
                        "--variant", "learnable_sink", "--gated", "--set", "train.lr=1e-4"]) == 0
    cfg = load_config(ckpt / "config.yaml")
    assert (cfg.attention.variant, cfg.attention.gated, cfg.train.lr) == ("learnable_sink", True, 1e-4)
    state = init_state(ckpt, cfg)  # what train.init_from starts from
    model = OPTForCausalLM(cfg.model, seq_length=cfg.data.seq_length)
    model.load_state_dict(state, strict=True)
    attn = model.decoder.layers[1].self_attn
    assert torch.equal(attn.sink_logit, torch.zeros(4))  # new parameters start as in a fresh model
    assert torch.allclose(attn.gate.bias, torch.full((4,), math.log(0.25 / 0.75)))
    original = load_file(opt_folder / "model.safetensors")
    for key, value in original.items():
        assert torch.equal(state[key.removeprefix("model.")], value), key
    # the run reads the imported GPT-2-style tokenizer through data.tokenizer: hf:<dir>
    tokenizer, hf = open_tokenizer(cfg.data.tokenizer), AutoTokenizer.from_pretrained(opt_folder)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (len(hf), 2, 1)
    text = wiki_texts(1, skip=7000)[0] + "\nnext line"
    assert tokenizer.encode(text) == hf(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.fingerprint == open_tokenizer(cfg.data.tokenizer).fingerprint


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert import_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_unsupported_or_broken_models_fail_with_one_line(opt_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import OPTConfig

    out = str(tmp_path / "out")
    assert "model folder not found" in _error(capsys, "--model", str(tmp_path / "nowhere"), "--out", out)
    post_ln = tmp_path / "post-ln"  # facebook/opt-350m's shape: post-LayerNorm, 512-wide embeddings projected
    OPTConfig(**{**OPT_SHAPE, "do_layer_norm_before": False}).save_pretrained(post_ln)
    assert "do_layer_norm_before=False" in _error(capsys, "--model", str(post_ln), "--out", out)
    projected = tmp_path / "projected"
    OPTConfig(**{**OPT_SHAPE, "word_embed_proj_dim": 16}).save_pretrained(projected)
    assert "project_in" in _error(capsys, "--model", str(projected), "--out", out)
    no_weights = tmp_path / "no-weights"
    OPTConfig(**OPT_SHAPE).save_pretrained(no_weights)
    assert "tokenizer" in _error(capsys, "--model", str(no_weights), "--out", out)
    assert str(no_weights) in _error(capsys, "--model", str(no_weights), "--out", out, "--tokenizer", str(opt_folder))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "not empty" in _error(capsys, "--model", str(opt_folder), "--out", str(tmp_path / "taken"))
    assert not Path(out).exists()


@pytest.mark.slow
def test_pretraining_continues_from_imported_opt_and_exports_with_equal_perplexity(
        opt_folder: Path, data_cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from data_pipeline import BlockStream, batch_iterator, validation_blocks
    from launcher.evaluate import evaluate_checkpoint

    ckpt, runs = tmp_path / "opt_softmax1", tmp_path / "runs"
    settings = {"data.cache_dir": data_cache, "data.seq_length": 32, "train.steps": 2, "train.micro_batch_size": 2,
                "train.global_batch_size": 2, "train.warmup_steps": 1, "train.checkpoint_interval": 2,
                "eval.interval": 2, "eval.max_blocks": 4, "eval.outlier_interval": "null",
                "logging.run_dir": runs, "logging.log_interval": 1, "logging.progress": "false"}
    args = ["--model", str(opt_folder), "--out", str(ckpt), "--config", "configs/opt_tiny.yaml", "--variant", "softmax1"]
    assert import_main(args + [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]) == 0
    result = run_pretrain([], config=str(ckpt / "config.yaml"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # step 1's loss is the imported model's loss on the first training batch: training started from its weights
    cfg = load_config(ckpt / "config.yaml")
    tokenizer = open_tokenizer(cfg.data.tokenizer)
    model = OPTForCausalLM(cfg.model, seq_length=32).eval()
    model.load_state_dict(init_state(ckpt, cfg))
    batch = next(batch_iterator(BlockStream(cfg.data, tokenizer, "train"), 2))
    with torch.no_grad():
        assert train_losses(runs / ckpt.name)[1] == pytest.approx(float(model(batch, labels=batch)), rel=1e-5)

    # the trained checkpoint exports; a plain transformers loop gives launcher.evaluate's FP perplexity
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(runs / ckpt.name), "--out", str(out)]) == 0
    evaluated = evaluate_checkpoint(runs / ckpt.name, quant=False)["val_ppl"]
    summary = json.loads((runs / ckpt.name / "summary.json").read_text())
    assert evaluated == pytest.approx(summary["val_ppl"], rel=1e-5)
    blocks = validation_blocks(cfg.data, tokenizer, max_blocks=cfg.eval.max_blocks)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf_perplexity(hf, blocks, micro_batch_size=2) == pytest.approx(evaluated, rel=1e-5)
