"""Failures inside a running job: one `error:` line, a non-zero exit code, every checkpoint intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_pretrain, tiny_overrides
from checkpoint.store import read_latest
from checkpoint.resume import resume_point

pytestmark = pytest.mark.slow

# Checkpoints every 2 steps; the fault strikes at step 5 (after step_4) or while writing step_4.
CASES = {
    "oom": (5, 1, ["out of memory with train.micro_batch_size=4 and data.seq_length=32",
                   "lower train.micro_batch_size"], "step_4"),
    "unwritable": (4, 1, ["step 4: cannot write checkpoint", "step_4/mp_rank_00_model_states.pt",
                          "Permission denied"], "step_2"),
    "crash": (5, 1, ["training failed: RuntimeError: injected failure", "crash.log"], "step_4"),
    "interrupt": (5, 130, ["interrupted (Ctrl-C)"], "step_4"),
}


@pytest.mark.parametrize("fault", sorted(CASES))
def test_fault_gives_one_line_and_keeps_the_last_checkpoint(fault: str, data_cache: Path, tmp_path: Path) -> None:
    at_step, code, phrases, latest = CASES[fault]
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.checkpoint_interval": 2, "logging.run_name": fault,
                                                          "eval.outlier_interval": "null"})
    result = run_pretrain(overrides, fault=(fault, at_step))
    assert result.returncode == code, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(phrase in errors[0] for phrase in phrases), errors[0]
    checkpoints = tmp_path / fault / "checkpoints"
    assert read_latest(checkpoints) == latest and f"{checkpoints / latest} is intact" in errors[0]
    assert resume_point(tmp_path / fault, "auto", world_size=1)[0] == (checkpoints, latest)


def test_redone_steps_after_a_crash_are_told_apart_by_segment(data_cache: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.checkpoint_interval": 2, "logging.run_name": "redo",
                                                          "eval.outlier_interval": "null"})
    assert run_pretrain(overrides, fault=("crash", 6)).returncode == 1  # steps 1-5 logged, step_4 saved
    assert run_pretrain(overrides, resume="auto").returncode == 0  # redoes 5, then 6
    records = [json.loads(line) for line in (tmp_path / "redo" / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["segment"]) for r in records if r["kind"] == "train"]
    assert train == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 1), (6, 1)]
