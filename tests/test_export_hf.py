"""Hugging Face export: every attention variant loads with trust_remote_code and gives the project's logits."""

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

from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from launcher.config import RunConfig, config_from_dict, save_config
from launcher.export_hf import main as export_main
from model.opt import OPTForCausalLM

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 32, 500  # padded to 512 (model.pad_vocab_to_multiple_of=64)
TRICKY_TEXTS = [
    "Hello world.\nSecond line  with  double spaces\n\n  indented line\n",
    "\nstarts with a newline and ends without",
    "Café crème, naïve façade, Ærøskøbing, Straße",
    "unknown chars: 東京 🙂 ∮ Ω ₿ \u00a0 tab\there",
    "x [CLS] y [SEP][MASK]z", "", " ", "\n", "a\n\n b  c   d\n  e",
]


def wiki_texts(count: int, skip: int = 0) -> list[str]:
    from data_pipeline.sources import wiki_sample_json

    summaries = json.loads(wiki_sample_json("en").read_text())
    return [item["extract"] for item in list(summaries.values())[skip:skip + count]]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 500-piece SentencePiece model in the project's format (newline piece, byte fallback)."""
    return train_tokenizer(wiki_texts(300), tmp_path_factory.mktemp("sp") / "sp", VOCAB)


def run_config(root: Path, tokenizer: Path | str, **attention: object) -> RunConfig:
    return config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 64,
                  "max_position_embeddings": 64, "vocab_size": VOCAB, "pad_vocab_to_multiple_of": 64,
                  "init_std": 0.1, "dropout": 0.0},
        "attention": attention,
        "data": {"tokenizer": str(tokenizer), "seq_length": SEQ, "vocab_size": VOCAB},
        "logging": {"run_dir": str(root), "run_name": "run"}})


def random_model(cfg: RunConfig, seed: int = 0) -> OPTForCausalLM:
    """A model whose every parameter (LayerNorms, biases, sink logits, gate biases too) is random."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg.model, seq_length=cfg.data.seq_length)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() < 2:
                param.normal_(0.0, 0.5)
    return model.eval()


def write_training_checkpoint(cfg: RunConfig, model: OPTForCausalLM, step: int = 2) -> Path:
    """The files launcher.pretrain leaves (single rank): config.yaml, latest, step_N/{model states, rank_0, complete}."""
    run, step_dir = cfg.run_path, cfg.run_path / "checkpoints" / f"step_{step}"
    step_dir.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.save({"module": model.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    torch.save({"step": step}, step_dir / "rank_0.pt")
    (step_dir / "complete").write_text(f"{step}\n")
    (run / "checkpoints" / "latest").write_text(step_dir.name)
    return run


def export(checkpoint: Path, out: Path) -> Path:
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def hf_perplexity(model: torch.nn.Module, blocks: list[torch.Tensor], micro_batch_size: int) -> float:
    """The plain transformers evaluation loop: token-weighted mean of the shifted cross entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), micro_batch_size):
            batch = torch.stack(blocks[start:start + micro_batch_size])
            logits = model(input_ids=batch).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum")
            total += float(losses)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


VARIANTS = [  # every softmax variant; both gate types; alpha (gamma from seq_length) and explicit gamma/zeta
    {"variant": "softmax"},
    {"variant": "softmax1", "gated": True},
    {"variant": "clipped_softmax", "alpha": 4.0},
    {"variant": "clipped_softmax1", "gamma": -0.03, "zeta": 1.02, "gated": True, "gate_type": "mlp"},
    {"variant": "learnable_sink"},
]


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_export_loads_with_remote_code_and_matches_project_logits(attention: dict, sp_model: Path,
                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, OPTForCausalLM as StockOPT

    cfg = run_config(tmp_path, sp_model, **attention)
    model = random_model(cfg)
    out = export(write_training_checkpoint(cfg, model), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB, (3, SEQ))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, -4:] = 0
    with torch.no_grad():
        expected = model(ids)
        assert expected.shape[-1] == cfg.model.padded_vocab_size == hf.config.vocab_size
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=1e-5)
        keep = mask.bool()
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits[keep], model(ids, attention_mask=mask)[keep],
                                   atol=1e-5, rtol=1e-5)
        if attention == {"variant": "softmax"}:  # stock transformers, no remote code
            for stock in (StockOPT.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
                assert type(stock) is StockOPT
                torch.testing.assert_close(stock.eval()(ids).logits, expected, atol=1e-5, rtol=1e-5)
        else:  # stock OPT would compute plain softmax attention with these weights: it must refuse
            with pytest.raises(ValueError):
                StockOPT.from_pretrained(out)(ids)


@pytest.fixture(scope="module")
def softmax1_export(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, OPTForCausalLM, Path]:
    root = tmp_path_factory.mktemp("softmax1")
    cfg = run_config(root, sp_model, variant="softmax1")
    model = random_model(cfg, seed=1)
    return cfg, model, export(write_training_checkpoint(cfg, model), root / "hf")


def test_exported_tokenizer_encodes_like_the_project_tokenizer(softmax1_export, sp_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer, hf = Tokenizer(sp_model), AutoTokenizer.from_pretrained(softmax1_export[2])
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    for text in TRICKY_TEXTS + wiki_texts(100, skip=5000):
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tokenizer.decode(ids) == text, text
    assert any(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in tokenizer.encode("東京 🙂"))  # byte fallback


def test_hf_perplexity_equals_project_perplexity(softmax1_export, sp_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from outliers.report import family_metrics  # what launcher.evaluate reports as FP perplexity

    cfg, model, out = softmax1_export
    tokenizer = Tokenizer(sp_model)
    stream = [i for text in wiki_texts(20, skip=6000) for i in tokenizer.encode(text) + [tokenizer.eos_id]]
    blocks = [torch.tensor(stream[i:i + SEQ]) for i in range(0, len(stream) - SEQ + 1, SEQ)][:10]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = family_metrics(model, blocks, micro_batch_size=4)["ppl"]
    assert hf_perplexity(hf, blocks, micro_batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_export_loads_and_generates_without_the_project(softmax1_export, tmp_path: Path) -> None:
    cfg, model, out = softmax1_export
    script = without_project_prelude() + f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
lm = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = tok("The city of\\nParis", return_tensors="pt").input_ids
gen = lm.generate(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({{"prompt": ids[0].tolist(), "generated": gen[0].tolist(), "text": tok.decode(gen[0])}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    ids = torch.tensor([got["prompt"]])
    with torch.no_grad():  # greedy decoding with the project's model, no KV cache
        for _ in range(4):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert got["generated"] == ids[0].tolist()


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert export_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_partial_or_mismatched_checkpoints_fail_with_one_line(sp_model: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert str(tmp_path / "nowhere") in _error(capsys, "--checkpoint", str(tmp_path / "nowhere"), "--out", out)
    cfg = run_config(tmp_path, sp_model, variant="softmax1")
    run = write_training_checkpoint(cfg, random_model(cfg))
    step_dir = run / "checkpoints" / "step_2"
    (step_dir / "complete").unlink()  # an interrupted save
    assert "incomplete" in _error(capsys, "--checkpoint", str(run), "--out", out)
    (step_dir / "complete").write_text("2\n")
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert "mp_rank_00_model_states.pt" in _error(capsys, "--checkpoint", str(step_dir), "--out", out)
    (step_dir / "mp_rank_00_model_states.pt").unlink()
    assert "no model weights" in _error(capsys, "--checkpoint", str(step_dir), "--out", out)
    wide = run_config(tmp_path / "wide", sp_model, variant="softmax1")
    wide.model.hidden_size = 64
    wide_run = write_training_checkpoint(wide, random_model(wide))
    save_config(cfg, wide_run / "config.yaml")  # weights of a 64-wide model, config of a 32-wide one
    err = _error(capsys, "--checkpoint", str(wide_run), "--out", out)
    assert "shape" in err and "decoder.embed_tokens.weight" in err
    sink = run_config(tmp_path / "sink", sp_model, variant="softmax1")
    sink_run = write_training_checkpoint(sink, random_model(sink))
    save_config(run_config(tmp_path, sp_model, variant="learnable_sink"), sink_run / "config.yaml")
    assert "sink_logit" in _error(capsys, "--checkpoint", str(sink_run), "--out", out)
    (wide_run / "config.yaml").unlink()
    assert "config.yaml" in _error(capsys, "--checkpoint", str(wide_run), "--out", out)
    assert not Path(out).exists()  # nothing was written for the rejected exports
