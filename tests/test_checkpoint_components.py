"""Checkpoint components: the writer stores {name: component.state_dict()} per rank and gives each its own
state back; checkpoints written before components saved themselves (the parallel model's RNG tracker and
manifest flat next to "data") still resume exactly and consolidate to the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint.store import COMPLETE, DATA, PARALLEL, _file_record, load_checkpoint, save_checkpoint
from common.errors import ProjectError
from conftest import run_pretrain, tiny_overrides, train_losses
from launcher.hf_checkpoint import load_full_state_dict


def flatten_to_old_layout(step_dir: Path) -> None:
    """Rewrite rank_0.pt as the code before checkpoint/ wrote it, and its record in the sha256 manifest."""
    rank_file = step_dir / "rank_0.pt"
    state = torch.load(rank_file, weights_only=False)
    parallel = state.pop(PARALLEL)
    torch.save({**state, "tp_rng": parallel["tp_rng"], "manifest": parallel["manifest"]}, rank_file)
    manifest = json.loads((step_dir / COMPLETE).read_text())
    manifest["files"]["rank_0.pt"] = _file_record(rank_file)
    (step_dir / COMPLETE).write_text(json.dumps(manifest))


def test_rank_file_holds_each_component_under_its_name(trained_run: Path) -> None:
    state = torch.load(trained_run / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)
    assert sorted(state) == [DATA, PARALLEL, "rng", "step"] and state["step"] == 6
    assert sorted(state[PARALLEL]) == ["manifest", "tp_rng"]
    assert state[PARALLEL]["manifest"]["layout"] == {"tensor": 1, "pipeline": 1, "data": 1}
    assert state[DATA]["blocks_emitted"] == 6 * 4  # six steps of four blocks


@pytest.mark.slow
def test_old_flat_checkpoint_resumes_exactly_and_consolidates_the_same(trained_run: Path, tmp_path: Path,
                                                                        data_cache: Path) -> None:
    _, new_weights = load_full_state_dict(trained_run / "checkpoints" / "step_6")
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    for step in ("step_3", "step_6"):
        flatten_to_old_layout(run / "checkpoints" / step)
    assert "manifest" in torch.load(run / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)
    _, old_weights = load_full_state_dict(run / "checkpoints" / "step_6")
    assert sorted(old_weights) == sorted(new_weights)
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in new_weights)

    shutil.rmtree(run / "checkpoints" / "step_6")  # `--resume auto` falls back to the old-layout step_3
    result = run_pretrain(tiny_overrides(data_cache, tmp_path, **{"logging.run_name": trained_run.name}),
                          resume="auto")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = train_losses(trained_run), train_losses(run)
    assert all(got[step] == expected[step] for step in (4, 5, 6))  # the data stream and RNGs continue exactly


class _Engine:
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        torch.save({"module": {}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        return str(Path(load_dir) / tag), {}


class _Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_components_get_their_own_state_back_and_a_missing_one_is_named(tmp_path: Path) -> None:
    save_checkpoint(_Engine(), tmp_path, 2, 0, {"counter": _Counter(7), "other": _Counter(3)}, keep=0)
    counter, other = _Counter(), _Counter()
    assert load_checkpoint(_Engine(), tmp_path, "step_2", 0, {"counter": counter, "other": other}) == 2
    assert (counter.value, other.value) == (7, 3)
    with pytest.raises(ProjectError, match=r"rank_0\.pt holds no 'absent' state"):
        load_checkpoint(_Engine(), tmp_path, "step_2", 0, {"absent": _Counter()})
