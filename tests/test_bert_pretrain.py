"""BERT masked-LM pretraining through the same launcher: outputs, outlier/W8A8 figures, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

BERT = "configs/bert_tiny.yaml"


def _bert_overrides(data_cache: Path, run_dir: Path, **extra: object) -> list[str]:
    # The tiny shape of the OPT tests, as an encoder: 32-token examples ([CLS] 30 tokens [SEP]), dropout on so
    # an exact resume also shows the RNG states are restored; outlier + W8A8 evaluation at the last step.
    values = {"model.dropout": 0.1, "model.layer_norm_eps": 1e-12, "eval.outlier_interval": 6,
              "eval.calibration_batches": 2, "eval.calibration_batch_size": 4, **extra}
    return tiny_overrides(data_cache, run_dir, **values)


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_bert_trains_evaluates_and_resumes_exactly(data_cache: Path, tmp_path: Path) -> None:
    straight = _bert_overrides(data_cache, tmp_path, **{"logging.run_name": "straight"})
    result = run_pretrain(straight, config=BERT)
    _assert_ok(result)
    assert "val MLM ppl" in result.stdout

    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_family"] == "bert" and summary["objective"] == "mlm"
    assert summary["completed"] and summary["val_ppl"] < summary["uniform_ppl"]
    for key in ("w8a8_val_ppl", "avg_kurtosis", "max_kurtosis", "max_inf_norm"):
        assert summary[key] is not None and summary[key] == summary[key], key  # present and not NaN
    outliers = json.loads((run / "checkpoints" / "step_6" / "outliers.json").read_text())
    modules = outliers["modules"]
    assert "bert.encoder.layer.1.output.dense" in modules and "bert.encoder.layer.1.output.LayerNorm" in modules
    # the periodic evaluation scores the same masked validation examples as the training loop's evaluation
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in val if r["kind"] == "val"][-1]
    assert outliers["val_loss"] == pytest.approx(last_val["loss"], rel=1e-5)

    split = _bert_overrides(data_cache, tmp_path, **{"logging.run_name": "split", "train.exit_interval": 3})
    _assert_ok(run_pretrain(split, config=BERT))
    _assert_ok(run_pretrain(split, config=BERT, resume="auto"))
    expected, resumed = train_losses(run), train_losses(tmp_path / "split")
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    final = {name: torch.load(tmp_path / name / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)["data"]
             for name in ("straight", "split")}
    assert final["straight"] == final["split"] and final["straight"]["mlm_seed"] == 1234
