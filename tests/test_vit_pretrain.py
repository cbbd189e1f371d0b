"""ViT through the launcher: launcher.pretrain (top-1, outliers, W8A8 top-1), launcher.evaluate agreeing with
the periodic evaluation, exact resume with dropout, stochastic depth and Mixup/CutMix on, launcher.study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, train_losses
from launcher import study
from launcher.evaluate import evaluate_checkpoint
from model.family import spec_for
from outliers.report import summary_keys

pytestmark = pytest.mark.slow

VIT = "configs/vit_tiny.yaml"
SUMMARY_KEYS = summary_keys(spec_for("vit"))


def vit_overrides(run_dir: Path, **extra: object) -> list[str]:
    """A 2-layer, 32-wide ViT on the digits: seconds per run. Dropout, stochastic depth and mixup are on, so an
    exact resume also shows that the RNG states and the seeded augmentation are restored."""
    values: dict[str, object] = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_heads": 4, "model.ffn_hidden_size": 64,
        "model.dropout": 0.1, "model.drop_path_rate": 0.1, "data.mixup": 0.2, "data.cutmix": 0.2,
        "train.steps": 6, "train.micro_batch_size": 8, "train.global_batch_size": 8, "train.warmup_steps": 2,
        "train.checkpoint_interval": 3, "eval.interval": 3, "eval.max_blocks": 32, "eval.outlier_interval": 6,
        "eval.calibration_batches": 2, "eval.calibration_batch_size": 4, "logging.log_interval": 1,
        "logging.run_dir": str(run_dir), "logging.progress": False}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("vit_runs")
    result = run_pretrain(vit_overrides(runs, **{"logging.run_name": "straight"}), config=VIT)
    _assert_ok(result)
    assert "val top-1" in result.stdout
    assert re.search(r"W8A8 top-1 \d+\.\d\d \([+-]\d+\.\d\d\)", result.stdout)  # with its change from FP
    return runs / "straight"


def test_vit_run_reports_top1_outliers_and_w8a8(vit_run: Path) -> None:
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["model_family"] == "vit" and summary["objective"] == "classification" and summary["completed"]
    assert 0 <= summary["val_top1"] <= 100 and 0 <= summary["w8a8_val_top1"] <= 100
    for key in ("avg_kurtosis", "max_kurtosis", "max_inf_norm"):
        assert summary[key] is not None and summary[key] == summary[key], key  # present and not NaN
    outliers = json.loads((vit_run / "checkpoints" / "step_6" / "outliers.json").read_text())
    assert {f"blocks.1.{m}" for m in ("norm1", "attn.out_proj", "norm2", "mlp.fc2")} | {"blocks.1", "norm"} \
        <= set(outliers["modules"])
    val = [json.loads(line) for line in (vit_run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in val if r["kind"] == "val"][-1]
    assert outliers["val_top1"] == pytest.approx(last_val["top1"]) and outliers["val_loss"] == pytest.approx(
        last_val["loss"], rel=1e-5)


def test_throughput_counts_images(vit_run: Path) -> None:
    """The family names its throughput unit (FamilySpec.throughput): images, not the patch positions as tokens.
    TFLOP/s stays the same quantity: FLOPs per image x images/s."""
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["images"] == 6 * 8 and summary["images_per_s"] > 0 and "tokens_per_s" not in summary
    records = [json.loads(line) for line in (vit_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["images"] for r in train] == [8 * step for step in range(1, 7)]
    assert all(r["images_per_s"] > 0 and r["tflops_per_device"] > 0 and "tokens_per_s" not in r for r in train)
    val = [r for r in records if r["kind"] == "val"]  # what the validation counted: images, not tokens
    assert val and all(r["images"] > 0 and "tokens" not in r for r in val)


def test_standalone_evaluation_matches_the_periodic_one(vit_run: Path) -> None:
    step_dir = vit_run / "checkpoints" / "step_6"
    saved = json.loads((step_dir / "outliers.json").read_text())
    result = evaluate_checkpoint(step_dir, quant=True)
    assert result["in_training"] == "identical"
    assert {k: result[k] for k in SUMMARY_KEYS} == {k: saved[k] for k in SUMMARY_KEYS}
    assert result["modules"] == saved["modules"]
    assert "w8a8_val_top1" in SUMMARY_KEYS and "val_top1" in SUMMARY_KEYS


def test_resume_continues_exactly(vit_run: Path) -> None:
    runs = vit_run.parent
    split = vit_overrides(runs, **{"logging.run_name": "split", "train.exit_interval": 3})
    _assert_ok(run_pretrain(split, config=VIT))
    _assert_ok(run_pretrain(split, config=VIT, resume="auto"))
    expected, resumed = train_losses(vit_run), train_losses(runs / "split")
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    final = {name: torch.load(runs / name / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)["data"]
             for name in ("straight", "split")}
    assert final["straight"] == final["split"] and final["straight"]["index"] == 48


def test_study_compares_variants_by_top1(tmp_path: Path) -> None:
    out = tmp_path / "study"
    code = study.main(["--config", VIT, "--variants", "softmax,softmax1+gated", "--steps", "4", "--out", str(out),
                       *[x for o in vit_overrides(tmp_path, **{"eval.outlier_interval": 4}) for x in ("--set", o)
                         if not o.startswith(("train.steps", "logging."))]])
    assert code == 0
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["variants"]) == {"softmax", "softmax1+gated"}
    for result in saved["variants"].values():
        assert 0 <= result["val_top1"] <= 100 and 0 <= result["w8a8_val_top1"] <= 100
    assert "top-1" in (out / "study.md").read_text()


def _image_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((9, 9, 3), 40 * i, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["missing folder", "corrupt image", "image size"])
def test_bad_image_input_stops_the_launcher_with_one_line(tmp_path: Path, case: str) -> None:
    folder = _image_folder(tmp_path / "images")
    (folder / "train" / "bee" / "1.png").write_bytes(b"not an image")
    extra, expected = {
        "missing folder": ({"data.source": "imagefolder", "data.path": str(tmp_path / "nowhere")},
                           f"config key 'data.path' = '{tmp_path / 'nowhere'}': is not a folder"),
        "corrupt image": ({"data.source": "imagefolder", "data.path": str(folder), "model.num_classes": 2,
                           "data.shuffle": False}, f"corrupt image {folder / 'train' / 'bee' / '1.png'}"),
        "image size": ({"model.image_size": 18}, "config key 'model.image_size' = 18: must be divisible by "
                                                 "model.patch_size=4"),
    }[case]
    result = run_pretrain(vit_overrides(tmp_path, **extra, **{"logging.run_name": "bad"}), config=VIT)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
