"""Activation recompute (parallel.activation_checkpointing: none | full | selective) in every layout: the same
losses and gradients as without it with dropout on (one process: OPT, BERT, ViT; TP2 and PP2 over gloo), and
measured peak activation memory falling by the factor launcher/planner.py predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.config import config_from_dict, load_config
from launcher.memory_probe import measure_activation_peak
from launcher.planner import LayoutChoice, device_named, plan_layout
from model.family import build_model, family_of
from model.recompute import apply_activation_checkpointing
from common.errors import ConfigError

SMALL = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 64, "max_position_embeddings": 16,
         "vocab_size": 128, "dropout": 0.2, "attention_dropout": 0.2}


def _loss_and_grads(cfg, mode: str, batch) -> tuple[float, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    model = build_model(cfg.model, seq_length=cfg.data.seq_length if hasattr(cfg.data, "seq_length") else None)
    model.train()
    apply_activation_checkpointing(model, mode, family_of(cfg.model))
    torch.manual_seed(11)  # the same dropout masks in every mode
    loss = model(batch.inputs, labels=batch.labels)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,raw", [
    ("opt", {"model": SMALL, "attention": {"variant": "softmax1", "backend": "eager"}, "data": {"seq_length": 16}}),
    ("bert", {"model": {**SMALL, "family": "bert"}, "attention": {"variant": "learnable_sink", "gated": True},
              "data": {"seq_length": 16}}),
    ("vit", None),
])
def test_recompute_equals_no_recompute_in_one_process(family: str, raw: dict | None) -> None:
    if raw is None:
        cfg = load_config("configs/vit_tiny.yaml", ["model.num_layers=2", "model.dropout=0.2",
                                                    "model.attention_dropout=0.2", "train.micro_batch_size=2"])
    else:
        cfg = config_from_dict({**raw, "train": {"micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32"}})
    batch = family_of(cfg.model).synthetic_batch(cfg, torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(cfg, "none", batch)
    for mode in ("full", "selective"):
        got_loss, got_grads = _loss_and_grads(cfg, mode, batch)
        assert got_loss == pytest.approx(loss, abs=1e-6), mode
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-6, msg=f"{mode}: {name}")


def test_measured_memory_falls_by_the_planned_factor() -> None:
    # eager attention (the [heads, T, T] scores selective recompute drops), vocabulary 512 so layers dominate
    config = "configs/opt_tiny.yaml"
    base = ["attention.backend=eager", "model.vocab_size=512", "data.vocab_size=512", "train.precision=fp32",
            "train.micro_batch_size=2", "train.global_batch_size=2"]
    cpu = device_named("cpu")
    planned, measured = {}, {}
    for mode in ("none", "full", "selective"):
        cfg = load_config(config, base + [f"parallel.activation_checkpointing={mode}"])
        planned[mode] = plan_layout(cfg, LayoutChoice(micro_batch_size=2, activation_checkpointing=mode),
                                    cpu).bytes["activations"]
        measured[mode] = measure_activation_peak(cfg)
    for mode in ("full", "selective"):
        planned_factor, measured_factor = planned["none"] / planned[mode], measured["none"] / measured[mode]
        assert abs(measured_factor / planned_factor - 1) <= 0.15, (mode, planned, measured)
    assert measured["full"] < measured["selective"] <= measured["none"]


def test_recompute_modes_are_checked_before_start() -> None:
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing"):
        load_config("configs/opt_tiny.yaml", ["parallel.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="recomputes full"):
        load_config("configs/stanhop_tiny.yaml", ["parallel.activation_checkpointing=selective"])
    # the old boolean still reads: true = full
    assert load_config("configs/opt_tiny.yaml", ["parallel.activation_checkpointing=true"]
                       ).parallel.activation_checkpointing == "full"


@pytest.mark.slow
def test_recompute_equals_no_recompute_under_tp2_and_pp2_with_dropout(tmp_path: Path) -> None:
    """One launch of 2 ranks: TP2 and PP2, each without recompute, full and selective, dropout 0.2; the losses
    and gradient norms of every step agree to 1e-6 and TP's replicated weights stay bitwise equal across ranks."""
    from test_parallel import _train

    layouts = [(tp, pp, 0, mode) for tp, pp in ((2, 1), (1, 2)) for mode in ("none", "full", "selective")]
    got = _train(tmp_path, 2, layouts, dropout=0.2, runs=("opt/softmax1_gated", "bert/softmax1"))
    for tp, pp in ((2, 1), (1, 2)):
        reference = got[f"{tp},{pp},0,none"]
        for mode in ("full", "selective"):
            runs = got[f"{tp},{pp},0,{mode}"]
            for run, expected in reference.items():
                assert runs[run]["loss"] == pytest.approx(expected["loss"], rel=0, abs=1e-6), (tp, pp, mode, run)
                assert runs[run]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-6), (tp, pp, mode, run)
                if tp > 1:
                    assert runs[run]["replicated_divergence"] == 0.0, (mode, run)
