"""Resuming: settings the checkpoint fixes are refused in one line before anything changes; the rest
(LR schedule, steps) really take effect and are logged; an older step of the same run is never resumed
in place (that would leave step folders of two histories side by side)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_pretrain, tiny_overrides
from launcher.pretrain import main
from launcher.config import RunConfig
from checkpoint.resume import config_changes, resume_point
from launcher.schedule import lr_at
from common.errors import ProjectError


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_changed_shape_or_data_is_refused_in_one_line_before_anything_changes(
        trained_run: Path, tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    sets = tiny_overrides(data_cache, tmp_path, **{"logging.run_name": run.name, "model.hidden_size": 64,
                                                     "data.seq_length": 16})
    assert main(["--config", "configs/opt_tiny.yaml", "--resume", "auto"] + [x for o in sets for x in ("--set", o)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume") and "\n" not in err, err
    assert "model.hidden_size (32 -> 64)" in err and "data.seq_length (32 -> 16)" in err
    assert snapshot(run) == before  # config.yaml was not rewritten


def test_an_older_step_of_the_same_run_is_refused_with_the_branch_command(trained_run: Path) -> None:
    older = trained_run / "checkpoints" / "step_3"
    with pytest.raises(ProjectError, match="older than this run's newest checkpoint step_6") as info:
        resume_point(trained_run, str(older), world_size=1)
    assert f"--set logging.run_name=base-from-step_3 --resume {older}" in str(info.value)
    # the branch it suggests: a new run directory continues from the older checkpoint
    assert resume_point(trained_run.parent / "base-from-step_3", str(older), world_size=1)[0] == (older.parent, "step_3")


@pytest.mark.slow
def test_changed_lr_and_steps_take_effect_and_are_recorded(trained_run: Path, tmp_path: Path,
                                                           data_cache: Path) -> None:
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    new = {"train.lr": 1e-3, "train.steps": 9, "logging.run_name": run.name, "eval.outlier_interval": "null"}
    result = run_pretrain(tiny_overrides(data_cache, tmp_path, **new), resume="auto")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train" and r["step"] > 6}
    schedule = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=9, schedule="cosine")  # opt_tiny + overrides
    assert lrs == pytest.approx({step: lr_at(step - 1, **schedule) for step in (7, 8, 9)}, rel=1e-9)
    (event,) = [r for r in records if "config_changed" in r]
    assert event["config_changed"]["train.lr"] == [3e-3, 1e-3] and event["config_changed"]["train.steps"] == [6, 9]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["steps"] == 9


def test_keys_added_to_or_dropped_from_the_schema_since_the_checkpoint_do_not_block_resume() -> None:
    """A checkpoint written before a key existed ran with what is now its default: a code update alone
    (a requeued job picking up a newer checkout) must not refuse the resume; a real change still does."""
    saved = RunConfig().to_dict()
    del saved["data"]["seq_length"], saved["train"]["lr"]  # keys "added" after the checkpoint was written
    saved["data"]["retired_key"] = 3  # a key the schema has since dropped
    assert config_changes(saved, RunConfig().to_dict(), RunConfig().to_dict()) == ({}, {})
    new = RunConfig().to_dict()
    new["data"]["seq_length"] += 1
    new["train"]["lr"] *= 2
    fixed, changeable = config_changes(saved, new, RunConfig().to_dict())
    assert list(fixed) == ["data.seq_length"] and list(changeable) == ["train.lr"]


def test_shard_by_auto_continues_a_checkpoint_of_either_sharding() -> None:
    """data.shard_by's default became auto: a checkpoint written with blocks (the old default) or documents resumes
    under auto (its data state says how the stream was split and auto continues it: tests/test_blend.py); a change
    between the explicit modes is refused."""
    defaults = RunConfig().to_dict()
    for mode in ("blocks", "documents"):
        saved = RunConfig().to_dict()
        saved["data"]["shard_by"] = mode
        assert config_changes(saved, RunConfig().to_dict(), defaults) == ({}, {"data.shard_by": (mode, "auto")})
    saved, new = RunConfig().to_dict(), RunConfig().to_dict()
    saved["data"]["shard_by"], new["data"]["shard_by"] = "blocks", "documents"
    assert list(config_changes(saved, new, defaults)[0]) == ["data.shard_by"]
