"""train.compile: the blocks compiled with torch.compile (Inductor) train exactly as eager ones (fp32 CPU, 1e-5):
OPT, BERT and ViT in one process, OPT and BERT under TP2; a compiled run through launcher.pretrain equals the
eager one, reports its compile time once, and its resume equals the uninterrupted compiled run.

Compilation costs tens of seconds on 2 cores, so the models are tiny and each test compiles each block class
once (Inductor's on-disk cache serves the later launches)."""

from __future__ import annotations

import copy
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


def _train(cfg, compiled: bool) -> tuple[list[float], torch.nn.Module]:  # type: ignore[no-untyped-def]
    spec = family_of(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, seq_length=spec.example_length(cfg))
    if compiled:
        assert compile_blocks(model, spec) >= 2
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


@pytest.mark.slow
def test_compiled_tensor_parallel_equals_eager(tmp_path: Path) -> None:
    from test_parallel import _train as train_layouts

    got = train_layouts(tmp_path, 2, [(2, 1, 0, "none"), (2, 1, 0, "none", "compile")],
                        runs=("opt/softmax1_gated", "bert/softmax1"))
    eager_runs, compiled_runs = got["2,1,0,none"], got["2,1,0,none,compile"]
    for run, expected in eager_runs.items():
        assert compiled_runs[run]["loss"] == pytest.approx(expected["loss"], rel=0, abs=1e-5), run


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
