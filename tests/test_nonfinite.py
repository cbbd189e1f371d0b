"""Non-finite training: never applied, never checkpointed, `latest` stays on the last good checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_pretrain, tiny_overrides
from checkpoint.store import read_latest, resolve_checkpoint
from launcher.schedule import lr_at
from launcher.nonfinite import NonFiniteGuard, NonFiniteStop, skip_nonfinite_updates


def strict_json(text: str) -> Any:
    """json.loads that rejects the bare NaN/Infinity Python's json writes (they are not JSON)."""
    def reject(name: str) -> None:
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=reject)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def model_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_optimizer_refuses_a_non_finite_update() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.5)
    skip_nonfinite_updates(optimizer)
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    weight.grad = torch.tensor([1.0, 1.0, 1.0])
    optimizer.step()
    assert not optimizer.overflow and bool((weight.detach() < 1).all())


def test_guard_stops_or_skips_up_to_the_bound() -> None:
    with pytest.raises(NonFiniteStop, match="step 7: non-finite training loss"):
        NonFiniteGuard("stop", 3).check(7, float("nan"), 1.0, update_skipped=True)
    guard = NonFiniteGuard("skip", 2)
    assert guard.check(1, 2.0, float("inf"), update_skipped=True) == "gradient norm (inf)"
    assert guard.check(2, 2.0, 1.0, update_skipped=False) is None  # a good step resets the count
    guard.check(3, float("nan"), None, update_skipped=True)
    guard.check(4, float("nan"), None, update_skipped=True)
    with pytest.raises(NonFiniteStop, match="train.max_nonfinite_skips=2"):
        guard.check(5, float("nan"), None, update_skipped=True)
    # fp16 loss scaling skips overflowing updates by design: only the loss counts there
    assert NonFiniteGuard("stop", 1, loss_scaled=True).check(1, 2.0, float("inf"), update_skipped=True) is None


@pytest.mark.slow
def test_divergence_stops_at_the_first_non_finite_step(data_cache: Path, tmp_path: Path) -> None:
    # lr=1e6: the first update is finite, the second step's gradient norm is inf (the report).
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.lr": 1e6, "train.checkpoint_interval": 1,
                                                          "train.keep_checkpoints": 1, "logging.run_name": "diverged",
                                                          "eval.outlier_interval": "null"})
    result = run_pretrain(overrides)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: step 2: non-finite gradient norm (inf)") and "step_1 is intact" in line, line
    checkpoints = tmp_path / "diverged" / "checkpoints"
    assert read_latest(checkpoints) == "step_1" and sorted(p.name for p in checkpoints.glob("step_*")) == ["step_1"]
    summary = strict_json((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["stopped_by"] == "nonfinite" and not summary["completed"] and summary["steps"] == 1
    for record in (tmp_path / "diverged" / "metrics.jsonl").read_text().splitlines():
        strict_json(record)


@pytest.mark.slow
def test_blow_up_after_a_good_checkpoint_keeps_it_as_latest(data_cache: Path, tmp_path: Path) -> None:
    # Checkpoints at 2 and 4 (keep 1), NaN weights before step 5, a checkpoint due at 6: nothing after 4 is
    # saved, and pruning never removes step_4.
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.steps": 8, "train.checkpoint_interval": 2,
                                                          "train.keep_checkpoints": 1, "logging.run_name": "nan",
                                                          "eval.outlier_interval": "null", "eval.interval": 100})
    result = run_pretrain(overrides, fault=("nan_weights", 5))
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: step 5: non-finite training loss (nan)"), line
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert read_latest(checkpoints) == "step_4"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_4"]
    assert resolve_checkpoint(checkpoints, world_size=1) == (checkpoints, "step_4")
    assert all(bool(torch.isfinite(w).all()) for w in model_weights(checkpoints / "step_4").values())
    summary = strict_json((tmp_path / "nan" / "summary.json").read_text())
    assert summary["stopped_by"] == "nonfinite" and summary["checkpoint"].endswith("step_4")


@pytest.mark.slow
def test_skip_policy_skips_a_transient_nan_and_bounds_a_persistent_one(data_cache: Path, tmp_path: Path) -> None:
    transient = tiny_overrides(data_cache, tmp_path, **{"train.nonfinite": "skip", "logging.run_name": "skip",
                                                          "eval.outlier_interval": "null"})
    result = run_pretrain(transient, fault=("nan_loss", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [strict_json(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped_update" in r] == [3]
    lr = [r["lr"] for r in records if r["kind"] == "train"]
    schedule = dict(lr=3e-3, min_lr=1e-4, warmup_steps=2, total_steps=6, schedule="cosine")  # opt_tiny + tiny_overrides
    # the skipped update did not advance the LR schedule either: step 4 runs at step 3's LR
    assert lr == pytest.approx([lr_at(i, **schedule) for i in (0, 1, 2, 2, 3, 4)], rel=1e-12)
    summary = strict_json((tmp_path / "skip" / "summary.json").read_text())
    assert summary["completed"] and summary["val_loss"] is not None
    assert all(bool(torch.isfinite(w).all()) for w in model_weights(tmp_path / "skip" / "checkpoints" / "step_6").values())

    persistent = tiny_overrides(data_cache, tmp_path, **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 2,
                                                           "train.checkpoint_interval": 100,
                                                           "logging.run_name": "stuck", "eval.outlier_interval": "null"})
    result = run_pretrain(persistent, fault=("nan_weights", 2))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: step 4: non-finite") and "train.max_nonfinite_skips=2" in line, line
    assert read_latest(tmp_path / "stuck" / "checkpoints") is None
