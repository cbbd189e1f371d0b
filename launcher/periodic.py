"""Periodic components of the training loop: what runs after a step when it is due.

The loop (`launcher/trainer.py`) trains one step, then asks every component in order `due(step)` and calls
`run(state)` on those that are; after the last step each component's `finish(state)` runs once, and the run's
summary is assembled from what the components' `summary()` report. A component is a small class; the built-in
ones are in `launcher/components.py` (train log, validation, stop request, checkpoint, outlier + W8A8
evaluation, lm-eval, test evaluation). A user adds one without editing the repository by naming a factory in
`train.periodic: [package.module:NAME]` (called with the run config, it returns a `PeriodicComponent`); such
components run after the built-in ones, every rank runs them, and they log through `state.metrics` (rank 0
writes metrics.jsonl and TensorBoard).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from checkpoint.store import step_tag
from common.errors import ConfigError
from common.plugins import import_named
from launcher.config import RunConfig
from launcher.distributed import WorldInfo
from launcher.metrics import MetricsLogger
from launcher.nonfinite import RunFailure
from model.family import FamilyData, FamilySpec

if TYPE_CHECKING:
    from parallel.engine import ParallelModel


@dataclass
class LossWindow:
    """Training losses since the last train log record (skipped updates left out), and when it began."""

    start: float = field(default_factory=time.perf_counter)
    loss_sum: float = 0.0
    steps: int = 0

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1

    def close(self) -> tuple[float, float, int]:
        """(mean loss or NaN, seconds, steps) of the window; a new one starts now."""
        mean = self.loss_sum / self.steps if self.steps else math.nan
        elapsed, steps = time.perf_counter() - self.start, self.steps
        self.start, self.loss_sum, self.steps = time.perf_counter(), 0.0, 0
        return mean, elapsed, steps


@dataclass
class TrainState:
    """What the loop knows after a step; components read it (and the train log closes its loss window)."""

    cfg: RunConfig
    world: WorldInfo
    spec: FamilySpec  # the model family: metrics, examples
    data: FamilyData  # this rank's training stream, validation (per source) and test examples
    pm: ParallelModel  # the parallel model: .engine (DeepSpeed), .full_state_dict(), .family
    device: torch.device
    metrics: MetricsLogger  # metrics.jsonl + TensorBoard (rank 0)
    progress: Any  # the tqdm bar; lines go through `say` so they do not break it
    step: int  # steps trained so far (the step just finished)
    start_step: int  # where this process started (a resumed run: the checkpoint's step)
    window: LossWindow = field(default_factory=LossWindow)
    lr: float = math.nan  # the last step's learning rate
    grad_norm: float | None = None  # the last step's global gradient norm
    failure: RunFailure | None = None  # why the run stopped early (non-finite loss or weights)

    @property
    def last_step(self) -> int:
        return self.cfg.train.steps

    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.run_path / "checkpoints"

    def step_dir(self) -> Path:
        """This step's checkpoint folder (written when a component with `needs_checkpoint` is due)."""
        return self.checkpoint_dir / step_tag(self.step)

    def say(self, line: str | None) -> None:
        if line and self.world.is_main:
            self.progress.write(line)

    def evaluate(self, examples: list[Any]) -> dict[str, float]:
        """The family's metrics of the training model on `examples` (a collective over data-parallel ranks)."""
        from parallel.engine import eval_loss

        return eval_loss(self.pm, examples, self.cfg.train.micro_batch_size, self.device)


class PeriodicComponent:
    """Runs every `interval` steps and at the last step (never with interval None); subclasses override `run`
    and, where they need to, `due`, `finish` and `summary`."""

    name = "periodic"
    # True: runs on the checkpoint written at its step (the checkpoint component writes one when it is due).
    needs_checkpoint = False

    def __init__(self, interval: int | None, last_step: int) -> None:
        self.interval, self.last_step = interval, last_step

    def due(self, step: int) -> bool:
        return self.interval is not None and (step % self.interval == 0 or step == self.last_step)

    def run(self, state: TrainState) -> None:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def finish(self, state: TrainState) -> None:
        """Once after the loop, also when it trained no step (a run resumed at its last step)."""

    def summary(self) -> dict[str, Any]:
        """Keys this component adds to summary.json (read after `finish`)."""
        return {}


ComponentFactory = Callable[[RunConfig], PeriodicComponent]


def user_components(cfg: RunConfig) -> list[PeriodicComponent]:
    """The components `train.periodic` names (`package.module:NAME`, each called with the run config); one
    ConfigError line for a name that does not import or does not make a PeriodicComponent."""
    made = []
    for index, name in enumerate(cfg.train.periodic):
        key = f"train.periodic[{index}]"
        factory = import_named(name, object, key)
        component = factory(cfg) if callable(factory) else None
        if not isinstance(component, PeriodicComponent):
            raise ConfigError(key, name, "must name a callable that returns a launcher.periodic.PeriodicComponent")
        made.append(component)
    return made
