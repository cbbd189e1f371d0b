"""Acceptance of issue 25: a periodic component defined in this file only (no edit in the repository) runs in
launcher.pretrain's loop at its interval, on the checkpoint written for it, and appears in summary.json,
metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_overrides
from launcher.config import RunConfig
from launcher.periodic import PeriodicComponent, TrainState
from launcher.pretrain import main

pytestmark = pytest.mark.slow

COMPONENT = f"{Path(__file__).stem}:WeightNorm"


class WeightNorm(PeriodicComponent):
    """Every 2 steps (and at the last): the global L2 norm of the weights, read from the checkpoint just
    written for it (so it also proves the checkpoint exists when a component that needs one is due)."""

    name = "weight_norm"
    needs_checkpoint = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(2, cfg.train.steps)
        self.steps: list[int] = []
        self.last = float("nan")

    def run(self, state: TrainState) -> None:
        assert (state.step_dir() / "complete").is_file(), f"no checkpoint at step {state.step}"
        self.steps.append(state.step)
        self.last = float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in state.pm.engine.module.parameters())))
        state.metrics.log(state.step, "weight_norm", {"l2": self.last, "runs": len(self.steps)})

    def summary(self) -> dict[str, Any]:
        return {"weight_norm_l2": self.last, "weight_norm_steps": self.steps}


def test_a_component_from_a_test_file_runs_at_its_interval(data_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # importable by name, as a user's package would be
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.steps": 5, "train.checkpoint_interval": 100,
                                                        "eval.outlier_interval": "null",
                                                        "logging.run_name": "custom", "train.periodic": f"[{COMPONENT}]"})
    assert main(["--config", "configs/opt_tiny.yaml", *[x for o in overrides for x in ("--set", o)]]) == 0
    run = tmp_path / "custom"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weight_norm_steps"] == [2, 4, 5] and summary["weight_norm_l2"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["runs"]) for r in records if r["kind"] == "weight_norm"] == [(2, 1), (4, 2), (5, 3)]
    events = EventAccumulator(str(run / "tb")).Reload()
    scalars = events.Scalars("weight_norm/l2")
    assert [s.step for s in scalars] == [2, 4, 5]
    assert scalars[-1].value == pytest.approx(summary["weight_norm_l2"], rel=1e-6)
    # the checkpoint it asked for was written at steps 2 and 4 although checkpoint_interval is 100
    assert {p.name for p in (run / "checkpoints").glob("step_*")} == {"step_4", "step_5"}  # keep_checkpoints=2


def test_a_name_that_makes_no_component_is_one_error_line(data_cache: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.periodic": "[builtins:repr]"})
    assert main(["--config", "configs/opt_tiny.yaml", *[x for o in overrides for x in ("--set", o)]]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: config key 'train.periodic[0]' = 'builtins:repr': must name a callable that returns a "
        "launcher.periodic.PeriodicComponent"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_the_metrics_writers_component_gives_tensorboard_the_steps_records(tmp_path: Path) -> None:
    """MetricsWriters: a record is in metrics.jsonl when logged, and reaches the writers (here TensorBoard's
    SummaryWriter, recorded) when the component runs after the step; finish closes them."""
    from types import SimpleNamespace

    from launcher.components import MetricsWriters
    from launcher.metrics import MetricsLogger

    class Recorder:  # SummaryWriter's methods the logger calls
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []
            self.closed = False

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False, defer_writers=True)
    metrics.writer = recorder = Recorder()  # type: ignore[assignment]
    metrics.log(3, "train", {"loss": 1.5, "note": "text is not a scalar"})
    metrics.log(3, "val", {"loss": 1.25})
    assert [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        ["train", "val"] and recorder.scalars == []
    writers = MetricsWriters(SimpleNamespace(train=SimpleNamespace(steps=10)))  # type: ignore[arg-type]
    state = SimpleNamespace(metrics=metrics, failure=None)
    assert writers.due(3)
    writers.run(state)  # type: ignore[arg-type]
    assert recorder.scalars == [("train/loss", 1.5, 3), ("val/loss", 1.25, 3)]
    metrics.log(4, "train", {"loss": 1.0})
    writers.finish(state)  # type: ignore[arg-type]
    assert recorder.scalars[-1] == ("train/loss", 1.0, 4) and recorder.closed and metrics.writers == []
    metrics.close()
