"""End-to-end training: outputs, exact resume, data parallel vs one process, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, tiny_overrides, train_losses
from launcher.pretrain import main

pytestmark = pytest.mark.slow


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_resume_continues_exactly_and_writes_run_outputs(data_cache: Path, tmp_path: Path) -> None:
    # Dropout on: an exact match also shows that RNG states are checkpointed and restored.
    common = dict(**{"model.dropout": 0.1})
    straight = tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "straight"})
    _assert_ok(run_pretrain(straight))
    split = tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "split", "train.exit_interval": 3})
    first = run_pretrain(split)
    _assert_ok(first)
    assert "exit_interval reached" in first.stdout + first.stderr
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["completed"] is False
    _assert_ok(run_pretrain(split, resume="auto"))

    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    # the data stream continued exactly: the final stream states agree
    final = {name: torch.load(tmp_path / name / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)["data"]
             for name in ("straight", "split")}
    assert final["straight"] == final["split"]

    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 6 and summary["val_ppl"] < summary["uniform_ppl"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_6"
    assert {p.name for p in (run / "checkpoints").glob("step_*")} == {"step_3", "step_6"}


@pytest.fixture(scope="module")
def single_process_losses(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("single")
    _assert_ok(run_pretrain(tiny_overrides(data_cache, run_dir, **{"train.steps": 4, "logging.run_name": "single"})))
    return train_losses(run_dir / "single")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_data_parallel_ranks_match_single_process(data_cache: Path, tmp_path: Path, zero_stage: int,
                                                      single_process_losses: dict[int, float]) -> None:
    # shard_by=blocks: both ranks read the global stream, so step k is the single process's global batch (the
    # default, auto, shards documents: each rank packs its own, tests/test_blend.py's documents tests).
    dp = tiny_overrides(data_cache, tmp_path, **{"train.steps": 4, "parallel.zero_stage": zero_stage,
                                                 "logging.run_name": "dp2", "train.micro_batch_size": 2,
                                                 "data.shard_by": "blocks"})
    result = run_pretrain(dp, ranks=2)
    _assert_ok(result)
    assert json.loads((tmp_path / "dp2" / "summary.json").read_text())["world_size"] == 2
    expected, got = single_process_losses, train_losses(tmp_path / "dp2")
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_two_ranks_with_the_default_sharding_resume_exactly(data_cache: Path, tmp_path: Path,
                                                             single_process_losses: dict[int, float]) -> None:
    """DP2 with the default data.shard_by (auto: each rank packs its own documents, behind the prefetch thread): a
    run branched from the step-3 checkpoint (each rank restores its own stream position) continues with the
    uninterrupted run's losses; the ranks' positions differ, and the global batches are not one process's."""
    common = {"train.steps": 4, "train.micro_batch_size": 2, "train.checkpoint_interval": 2}
    _assert_ok(run_pretrain(tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "whole"}), ranks=2))
    step_2 = tmp_path / "whole" / "checkpoints" / "step_2"
    branch = tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "branch"})
    _assert_ok(run_pretrain(branch, ranks=2, resume=str(step_2)))
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "branch")
    assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=0) for s in got)
    states = [torch.load(step_2 / f"rank_{r}.pt", weights_only=False)["data"] for r in range(2)]
    assert [state["shard_by"] for state in states] == ["documents"] * 2
    assert (states[0]["doc_index"], states[0]["buffer"]) != (states[1]["doc_index"], states[1]["buffer"])
    assert expected[1] != pytest.approx(single_process_losses[1], rel=1e-5)  # documents, not the global stream


def _bad_run(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not torch.distributed.is_initialized()  # rejected before any process group
    return err


def test_bad_input_fails_with_one_line_before_training(data_cache: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", "configs/opt_tiny.yaml"]
    sets = lambda **kw: [x for o in tiny_overrides(data_cache, tmp_path, **kw) for x in ("--set", o)]  # noqa: E731
    assert "attention.variant" in _bad_run(capsys, base + sets(**{"attention.variant": "softmax2"}))
    assert "model.num_heads" in _bad_run(capsys, base + sets(**{"model.num_heads": 5}))
    missing = tmp_path / "nowhere.txt"
    assert str(missing) in _bad_run(capsys, base + sets(**{"data.source": "files", "data.train_files": f"[{missing}]"}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "empty" in _bad_run(capsys, base + sets(**{"data.source": "files", "data.train_files": f"[{empty}]",
                                                       "data.validation_files": f"[{empty}]"})).lower()
    broken = tmp_path / "broken" / "step_5"
    broken.mkdir(parents=True)
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    assert str(broken) in _bad_run(capsys, base + sets() + ["--resume", str(broken)])
    assert "config file not found" in _bad_run(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert not (tmp_path / "opt_tiny").exists()  # nothing was written for the rejected runs
