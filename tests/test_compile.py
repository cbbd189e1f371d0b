"""train.compile: the blocks compiled with torch.compile (Inductor) train exactly as eager ones (fp32 CPU, 1e-5):
OPT, BERT, ViT and a clipped-softmax variant in one process, OPT and BERT under TP2 and ZeRO-3 (ViT under TP2:
tests/test_vit_parallel.py); a block that cannot compile (here: no working C++ compiler for Inductor) says so
in one line and trains eagerly; a compiled run through launcher.pretrain equals
the eager one, reports its compile time once, and its resume equals the uninterrupted compiled run.

Compilation costs tens of seconds on 2 cores, so the models are tiny and each test compiles each block class
once (Inductor's on-disk cache serves the later launches)."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, tiny_overrides, train_losses
from launcher.config import config_from_dict, load_config
from model.compile import compile_blocks, eager
from model.family import build_model, family_of

STEPS = 10
TEXT = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 64, "max_position_embeddings": 16,
        "vocab_size": 128, "dropout": 0.0}


def _configs() -> dict[str, object]:
    train = {"micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32"}
    return {
        "opt": config_from_dict({"model": TEXT, "attention": {"variant": "softmax1"}, "data": {"seq_length": 16},
                                 "train": train}),
        "bert": config_from_dict({"model": {**TEXT, "family": "bert"}, "data": {"seq_length": 16},
                                  "attention": {"variant": "learnable_sink", "gated": True}, "train": train}),
        "vit": load_config("configs/vit_tiny.yaml", ["model.num_layers=2", "train.micro_batch_size=2",
                                                     "train.precision=fp32"]),
    }


def _variant_configs() -> dict[str, object]:
    """Variants whose blocks differ from _configs' (clipped softmax's eager attention). STanHop-Net compiles
    exactly too (README) but its cold compile takes minutes on 2 cores, too long for the suite."""
    train = {"micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32"}
    return {"opt/clipped_softmax1": config_from_dict({"model": TEXT, "attention": {"variant": "clipped_softmax1"},
                                                      "data": {"seq_length": 16}, "train": train})}


def _train(cfg, compiled: bool) -> tuple[list[float], torch.nn.Module]:  # type: ignore[no-untyped-def]
    spec = family_of(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, seq_length=spec.example_length(cfg))
    if compiled:
        assert compile_blocks(model, spec) >= 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(STEPS):
        batch = spec.synthetic_batch(cfg, generator)
        loss = model(batch.inputs, labels=batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def test_compiled_training_equals_eager_for_every_family_in_one_process() -> None:
    for family, cfg in _configs().items():
        expected, _ = _train(cfg, compiled=False)
        got, model = _train(cfg, compiled=True)
        assert got == pytest.approx(expected, rel=0, abs=1e-5), family
        block = family_of(cfg.model).blocks(model)[0]
        assert type(block).__name__.startswith("Compiled")
        assert set(model.state_dict()) == set(build_model(cfg.model, seq_length=family_of(cfg.model)
                                                          .example_length(cfg)).state_dict())  # names unchanged
        # a deep copy (what W8A8 quantizes) runs its own weights, eagerly under eager()
        clone = copy.deepcopy(model)
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)
        batch = family_of(cfg.model).synthetic_batch(cfg, torch.Generator().manual_seed(5))
        model.eval(), clone.eval()
        with eager(), torch.no_grad():
            assert not torch.equal(clone(batch.inputs), model(batch.inputs)), family


def test_compiled_variants_equal_eager_in_one_process() -> None:
    for name, cfg in _variant_configs().items():
        expected, _ = _train(cfg, compiled=False)
        got, model = _train(cfg, compiled=True)
        assert got == pytest.approx(expected, rel=0, abs=1e-5), name
        assert all(type(b).__name__.startswith("Compiled") for b in family_of(cfg.model).blocks(model)), name


def test_a_block_that_cannot_compile_says_so_in_one_line_and_trains_eagerly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Inductor without a working C++ compiler (a real failure: it probes the compiler and raises)."""
    import torch._inductor.config as inductor_config

    from model import block_forward

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing cached: Inductor must build
    monkeypatch.setattr(block_forward, "_SUBCLASSES", {})  # a fresh compiled class, not the other tests' one
    cfg = _configs()["opt"]
    expected, _ = _train(cfg, compiled=False)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), caplog.at_level(logging.WARNING, "model.compile"):
        got, _ = _train(cfg, compiled=True)
    lines = [record.getMessage() for record in caplog.records if record.name == "model.compile"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("train.compile: OPTDecoderLayer cannot compile (") and "C++ compiler" in lines[0]
    assert lines[0].endswith("it runs eagerly")
    assert got == pytest.approx(expected, rel=0, abs=1e-6)


@pytest.mark.slow
def test_compiled_tensor_parallel_and_zero3_equal_eager(tmp_path: Path) -> None:
    """TP2 (megatron-core's layers and collectives between compiled blocks) over 2 ranks; ZeRO-3 (DeepSpeed's
    parameter hooks inside each compiled block) in one process, which has them as DP2 does."""
    from test_parallel import _train as train_layouts

    runs = ("opt/softmax1_gated", "bert/softmax1")
    got = {**train_layouts(tmp_path, 2, [(2, 1, 0, "none"), (2, 1, 0, "none", "compile")], runs=runs),
           **train_layouts(tmp_path, 1, [(1, 1, 3, "none"), (1, 1, 3, "none", "compile")], runs=runs)}
    for eager_layout in ("2,1,0,none", "1,1,3,none"):
        for run, expected in got[eager_layout].items():
            compiled = got[eager_layout + ",compile"][run]["loss"]
            assert compiled == pytest.approx(expected["loss"], rel=0, abs=1e-5), (eager_layout, run)


@pytest.mark.slow
def test_compiled_pretrain_equals_eager_and_resumes_exactly(data_cache: Path, trained_run: Path,
                                                           tmp_path: Path) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.compile": True, "logging.run_name": "compiled"})
    result = run_pretrain(overrides, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum("torch.compile: first step" in line for line in (result.stdout + result.stderr).splitlines()) == 1
    compiled = train_losses(tmp_path / "compiled")
    eager_losses = train_losses(trained_run)  # the same run, eager
    assert compiled == pytest.approx(eager_losses, rel=0, abs=1e-5)
    # interrupted after step 3 (its checkpoint), then resumed: the same losses as the uninterrupted run
    interrupted = tiny_overrides(data_cache, tmp_path, **{"train.compile": True, "logging.run_name": "resumed",
                                                          "train.exit_interval": 3})
    assert run_pretrain(interrupted, timeout=900).returncode == 0
    assert max(train_losses(tmp_path / "resumed")) == 3
    resumed = run_pretrain(interrupted[:-1] + ["train.exit_interval=null"], resume="auto", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(tmp_path / "resumed") == pytest.approx(compiled, rel=0, abs=1e-5)
