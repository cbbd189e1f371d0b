"""Periodic (in-training) outlier/W8A8 evaluation and `launcher.evaluate` on the same checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_pretrain, tiny_overrides
from launcher.evaluate import evaluate_checkpoint, main
from model.family import spec_for
from outliers.report import summary_keys

pytestmark = pytest.mark.slow

EVAL = {"eval.outlier_interval": 3, "eval.calibration_batches": 2, "eval.calibration_batch_size": 4,
        "train.checkpoint_interval": 100}  # step 3 is checkpointed because it is evaluated


@pytest.fixture(scope="module")
def evaluated_run(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    result = run_pretrain(tiny_overrides(data_cache, runs, **EVAL, **{"logging.run_name": "oe"}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "W8A8 ppl" in result.stdout and "W8A8 val ppl" in result.stdout  # periodic line and final summary
    return runs / "oe"

SUMMARY_KEYS = summary_keys(spec_for("opt"))  # the OPT runs' headline keys


def test_periodic_evaluation_is_logged_saved_and_summarised(evaluated_run: Path) -> None:
    summary = json.loads((evaluated_run / "summary.json").read_text())
    for key in ("val_ppl", "w8a8_val_ppl", "avg_kurtosis", "max_kurtosis", "max_inf_norm"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    assert summary["outlier_eval_s"] > 0
    records = [json.loads(line) for line in (evaluated_run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["kind"] == "outliers"}
    assert sorted(evals) == [3, 6]
    assert len(evals[6]["modules"]) == 2 * 5 + 1 and evals[6]["w8a8_val_ppl"] == summary["w8a8_val_ppl"]
    for step in (3, 6):
        saved = json.loads((evaluated_run / "checkpoints" / f"step_{step}" / "outliers.json").read_text())
        assert saved["step"] == step and saved["avg_kurtosis"] == evals[step]["avg_kurtosis"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(evaluated_run / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"outliers/w8a8_val_ppl", "outliers/avg_kurtosis", "outliers/max_inf_norm",
            "outliers_kurtosis/decoder.layers.1.fc2",
            "outliers_inf_norm/decoder.final_layer_norm"} <= set(tags["scalars"])
    assert "outliers/per_layer" in tags["images"] and "outliers/worst_module_activations" in tags["histograms"]


def test_standalone_evaluation_matches_the_periodic_one(evaluated_run: Path) -> None:
    for step in (3, 6):
        step_dir = evaluated_run / "checkpoints" / f"step_{step}"
        result = evaluate_checkpoint(step_dir, quant=True)
        assert result["in_training"] == "identical"
        saved = json.loads((step_dir / "outliers.json").read_text())
        assert {k: result[k] for k in SUMMARY_KEYS} == {k: saved[k] for k in SUMMARY_KEYS}
        assert result["modules"] == saved["modules"]


def test_cli_json_and_table(evaluated_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(evaluated_run), "--json"]) == 0  # a run directory: follows latest
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["w8a8_val_ppl"] is None and result["in_training"] == "identical"
    assert set(SUMMARY_KEYS) <= set(result)
    assert main(["--checkpoint", str(evaluated_run / "checkpoints"), "--quant", "w8a8"]) == 0
    out = capsys.readouterr().out
    assert "decoder.layers.1.self_attn.out_proj" in out and "w8a8_val_ppl" in out and "identical" in out


@pytest.fixture(scope="module")
def evaluated_bert_run(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("bert_runs")
    overrides = tiny_overrides(data_cache, runs, **EVAL, **{"logging.run_name": "be", "train.steps": 3})
    result = run_pretrain(overrides, config="configs/bert_tiny.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "W8A8 ppl" in result.stdout
    return runs / "be"


def test_bert_periodic_and_standalone_evaluations_agree(evaluated_bert_run: Path) -> None:
    step_dir = evaluated_bert_run / "checkpoints" / "step_3"
    saved = json.loads((step_dir / "outliers.json").read_text())
    # the protocol's BERT activations: per layer the FFN output dense, its LayerNorm's input and output
    assert set(saved["modules"]) == {f"bert.encoder.layer.{j}.{suffix}" for j in range(2)
                                     for suffix in ("output.dense", "output.LayerNorm:input", "output.LayerNorm")}
    assert 1 < saved["val_ppl"] < float("inf") and 1 < saved["w8a8_val_ppl"] < float("inf")
    result = evaluate_checkpoint(step_dir, quant=True)  # MLM perplexity on the same fixed masks
    assert result["in_training"] == "identical"
    assert {k: result[k] for k in SUMMARY_KEYS} == {k: saved[k] for k in SUMMARY_KEYS}
    assert result["modules"] == saved["modules"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(evaluated_bert_run / "tb"), size_guidance={"images": 0}).Reload()
    assert "outliers_inf_norm/bert.encoder.layer.1.output.LayerNorm_input" in events.Tags()["scalars"]
    assert "outliers/per_layer" in events.Tags()["images"]


def test_cli_rejects_bad_checkpoints_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def error(path: Path) -> str:
        assert main(["--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert str(tmp_path / "missing") in error(tmp_path / "missing")
    broken = tmp_path / "run" / "checkpoints" / "step_5"
    broken.mkdir(parents=True)
    assert "incomplete" in error(broken)
    (broken / "complete").write_text("5\n")
    (broken / "rank_0.pt").write_bytes(b"not a checkpoint")
    assert "config" in error(broken)
    (tmp_path / "run" / "config.yaml").write_text("train:\n  steps: 5\n")
    assert str(broken) in error(broken)
