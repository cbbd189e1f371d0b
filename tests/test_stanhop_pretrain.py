"""STanHop-Net through the launcher (issue 16): training vs the naive forecast, exact resume, data parallel vs
one process, periodic vs standalone W8A8 evaluation, and the one-line refusal of tensor/pipeline layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, train_losses
from launcher.evaluate import evaluate_checkpoint
from common.errors import ConfigError
from launcher.config import load_config
from launcher.slurm import check_world
from model.family import spec_for
from outliers.report import summary_keys

pytestmark = pytest.mark.slow

CONFIG = "configs/stanhop_tiny.yaml"
SPEC = spec_for("stanhop")


def tiny(run_dir: Path, **extra: object) -> list[str]:
    """A 2-scale, 16-wide STanHop-Net on the bundled series: seconds per run on CPU."""
    values: dict[str, object] = {
        "model.num_layers": 2, "model.d_model": 16, "model.d_ff": 32, "model.num_heads": 2,
        "model.pool_queries": 2, "model.dropout": 0.0, "data.max_validation_windows": 32, "data.max_test_windows": 32,
        "train.steps": 6, "train.micro_batch_size": 8, "train.global_batch_size": 8, "train.warmup_steps": 2,
        "train.checkpoint_interval": 3, "eval.interval": 3, "eval.max_blocks": 32, "eval.outlier_interval": "null",
        "logging.log_interval": 1, "logging.run_dir": str(run_dir), "logging.progress": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_training_beats_the_naive_forecast_and_resumes_exactly(tmp_path: Path) -> None:
    # Dropout on: an exact match also shows that RNG states are checkpointed and restored.
    common = {"model.dropout": 0.1, "model.d_model": 32, "model.d_ff": 64, "train.steps": 40,
              "train.micro_batch_size": 32, "train.global_batch_size": 32, "train.checkpoint_interval": 20,
              "eval.interval": 20, "train.lr": 3e-3}
    _ok(run_pretrain(tiny(tmp_path, **common, **{"logging.run_name": "straight"}), config=CONFIG))
    split = tiny(tmp_path, **common, **{"logging.run_name": "split", "train.exit_interval": 20})
    _ok(run_pretrain(split, config=CONFIG))
    _ok(run_pretrain(split, config=CONFIG, resume="auto"))
    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(expected) == sorted(resumed) == list(range(1, 41))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    final = {name: torch.load(tmp_path / name / "checkpoints" / "step_40" / "rank_0.pt", weights_only=False)["data"]
             for name in ("straight", "split")}
    assert final["straight"] == final["split"]

    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 40
    # MSE and MAE on the normalised validation windows, next to the naive last-value forecast's.
    assert summary["val_mse"] < summary["naive_last_mse"] and summary["val_mae"] < summary["naive_last_mae"], summary
    # Throughput in the family's unit: forecast windows (FamilySpec.throughput), not tokens.
    assert summary["windows"] == 40 * 32 and summary["windows_per_s"] > 0 and "tokens_per_s" not in summary
    train = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert train and all(r["windows"] == r["step"] * 32 and r["windows_per_s"] > 0 and "tokens" not in r
                         for r in train)
    val = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
           if '"kind": "val"' in line]
    assert val and all(r["points"] > 0 and "tokens" not in r for r in val)  # forecast values, not tokens


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("single")
    _ok(run_pretrain(tiny(run_dir, **{"train.steps": 4, "logging.run_name": "single"}), config=CONFIG))
    return train_losses(run_dir / "single")


def test_two_data_parallel_ranks_match_single_process(tmp_path: Path,
                                                      single_process_losses: dict[int, float]) -> None:
    dp = tiny(tmp_path, **{"train.steps": 4, "logging.run_name": "dp2", "train.micro_batch_size": 4})
    _ok(run_pretrain(dp, ranks=2, config=CONFIG))
    assert json.loads((tmp_path / "dp2" / "summary.json").read_text())["world_size"] == 2
    got = train_losses(tmp_path / "dp2")
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in single_process_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_periodic_and_standalone_w8a8_evaluations_are_identical(tmp_path: Path) -> None:
    overrides = tiny(tmp_path, **{"eval.outlier_interval": 3, "eval.calibration_batches": 2,
                                  "eval.calibration_batch_size": 8, "logging.run_name": "oe"})
    result = run_pretrain(overrides, config=CONFIG)
    _ok(result)
    run = tmp_path / "oe"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_mse", "val_mae", "w8a8_val_mse", "avg_kurtosis", "max_inf_norm"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    keys = summary_keys(SPEC)
    for step in (3, 6):
        step_dir = run / "checkpoints" / f"step_{step}"
        saved = json.loads((step_dir / "outliers.json").read_text())
        assert "encoder.0.block.time_hopfield" in saved["modules"]
        standalone = evaluate_checkpoint(step_dir, quant=True)
        assert standalone["in_training"] == "identical"
        assert {k: standalone[k] for k in keys} == {k: saved[k] for k in keys}
        assert standalone["modules"] == saved["modules"]

    # The test split, once at the end of the run (summary.json) and standalone (launcher.evaluate --split test):
    # the same windows and numbers; W8A8 through the same path.
    from model.stanhop.spec import naive_last_value

    test = evaluate_checkpoint(run / "checkpoints" / "step_6", quant=True, split="test")
    cfg = load_config(str(run / "config.yaml"))
    examples = SPEC.test_examples(cfg)
    assert test["test_examples"] == len(examples) == 32 and len(SPEC.test_examples(cfg, 10**9)) == 10510
    assert (test["test_loss"], test["test_mse"], test["test_mae"]) == (
        summary["test_loss"], summary["test_mse"], summary["test_mae"])
    assert test["test_mse"] > 0 and naive_last_value(examples)["naive_last_mse"] > 0  # 6 steps: no claim to beat it
    assert test["w8a8_test_mse"] == pytest.approx(test["test_mse"], rel=0.1)


@pytest.mark.parametrize("key", ["parallel.tensor", "parallel.pipeline"])
def test_tensor_and_pipeline_layouts_are_refused_in_one_line(key: str) -> None:
    """The launcher's layout check for a 2-rank world (what launcher.pretrain and launcher.slurm run first)."""
    cfg = load_config(CONFIG, overrides=[f"{key}=2"])
    with pytest.raises(ConfigError, match="data parallelism") as info:
        check_world(cfg, world_size=2)
    assert str(info.value).startswith(f"config key '{key}'") and "\n" not in str(info.value)


def test_study_compares_the_normalisers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher import study

    out = tmp_path / "study"
    overrides = tiny(tmp_path / "runs", **{"train.steps": 3, "eval.outlier_interval": 3, "eval.max_blocks": 16,
                                           "eval.calibration_batches": 1, "train.checkpoint_interval": 100})
    args = ["--config", CONFIG, "--variants", "entmax,softmax1,clipped_softmax1", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    assert study.main(args) == 0, capsys.readouterr().err + "".join(
        log.read_text()[-2000:] for log in out.glob("*.log"))
    results = json.loads((out / "study.json").read_text())["variants"]
    assert set(results) == {"entmax", "softmax1", "clipped_softmax1"}
    for name, result in results.items():
        assert result["steps"] == 3 and result["val_mse"] > 0 and result["w8a8_val_mse"] > 0, name
        assert f"variant: {name}" in (out / name / "config.yaml").read_text()
    assert len({result["val_mse"] for result in results.values()}) == 3
    assert "W8A8 MSE" in (out / "study.md").read_text()


@pytest.mark.parametrize("content, problem", [(None, "does not exist"), ("date,x\n1,1\n2,\n3,3\n", "NaN value")])
def test_a_bad_csv_stops_the_launcher_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    content: str | None, problem: str) -> None:
    from launcher.pretrain import main

    path = tmp_path / "series.csv"
    if content is not None:
        path.write_text(content)
    args = ["--config", CONFIG] + [x for o in tiny(tmp_path, **{"data.path": path}) for x in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "data.path" in err and problem in err, err
