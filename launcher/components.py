"""The training loop's built-in periodic components (launcher/periodic.py), in the order the loop runs them:
train log, validation, stop request, checkpoint, outlier + W8A8 evaluation, lm-eval, test evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from checkpoint.store import read_latest, save_checkpoint
from launcher.config import RunConfig, config_text
from launcher.metrics import MetricsLogger
from launcher.nonfinite import NonFiniteStop, RunFailure, weights_finite
from launcher.periodic import PeriodicComponent, TrainState
from launcher.periodic_lm_eval import PeriodicLmEval
from launcher.signals import GracefulStop
from launcher.summary import metric_text
from launcher.throughput import throughput_metrics
from model.family import FamilySpec
from outliers.periodic import PeriodicOutlierEval


@dataclass(frozen=True)
class Rates:
    """What a step trains on, in the family's unit (FamilySpec.throughput: tokens, images, windows), and what it
    costs: the train log's and the summary's `<unit>_per_s`, `<unit>` and TFLOP/s / MFU."""

    unit: str
    per_step: int  # units per optimizer step (global batch x units per example)
    flops_per_unit: float  # training FLOPs of one unit
    peak: float | None  # per-device peak TFLOP/s (None: no MFU)


class TrainLog(PeriodicComponent):
    """Every `logging.log_interval` steps: the window's mean loss, LR, gradient norm and throughput."""

    name = "train"

    def __init__(self, cfg: RunConfig, rates: Rates) -> None:
        super().__init__(cfg.logging.log_interval, cfg.train.steps)
        self.rates = rates
        self.last_loss = float("nan")

    def run(self, state: TrainState) -> None:
        self.last_loss, elapsed, steps = state.window.close()
        rates = self.rates
        per_s = steps * rates.per_step / elapsed
        record = {"loss": self.last_loss, "lr": state.lr,
                  "grad_norm": float(state.grad_norm) if state.grad_norm is not None else float("nan"),
                  f"{rates.unit}_per_s": per_s, rates.unit: state.step * rates.per_step,
                  **throughput_metrics(per_s, rates.flops_per_unit, state.world.world_size, rates.peak)}
        state.metrics.log(state.step, "train", record)
        state.progress.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{state.lr:.2e}")

    def summary(self) -> dict[str, Any]:
        return {"train_loss": self.last_loss}


class Validation(PeriodicComponent):
    """Every `eval.interval` steps: the family's metrics on the validation examples, and per source of a blend
    (metrics.jsonl kind "val/<source>", TensorBoard val/<source>/<metric>)."""

    name = "val"

    def __init__(self, cfg: RunConfig, spec: FamilySpec) -> None:
        super().__init__(cfg.eval.interval, cfg.train.steps)
        self.cfg, self.spec = cfg, spec
        self.values: dict[str, float] = {}

    def run(self, state: TrainState) -> None:
        self.values = state.evaluate(state.data.validation)
        state.metrics.log(state.step, "val", self.values)
        for name, examples in state.data.validation_by_source.items():
            by_source = state.evaluate(examples)
            state.metrics.log(state.step, f"val/{name}", by_source)
            state.say(f"step {state.step}: {name} {metric_text(self.spec, by_source)}")
        state.say(f"step {state.step}: val loss {self.values['loss']:.4f}, {metric_text(self.spec, self.values)}")

    def finish(self, state: TrainState) -> None:
        if not self.values and state.failure is None:  # resumed at or past the last step: still report
            self.values = state.evaluate(state.data.validation)

    def summary(self) -> dict[str, Any]:
        return {"val_loss": self.values.get("loss"),
                **{f"val_{m.name}": self.values.get(m.name) for m in self.spec.metrics},
                **self.spec.reference_values(self.cfg)}


class StopRequest(PeriodicComponent):
    """Every step: a stop signal on any rank (a collective) or `train.exit_interval` makes this step the last
    one of this process, after its checkpoint."""

    name = "stop"

    def __init__(self, cfg: RunConfig, stopper: GracefulStop) -> None:
        super().__init__(1, cfg.train.steps)
        self.exit_interval, self.stopper = cfg.train.exit_interval, stopper
        self.stopping = self.exiting = False

    def run(self, state: TrainState) -> None:
        self.stopping = self.stopper.should_stop()
        self.exiting = self.stopping or (bool(self.exit_interval) and state.step % self.exit_interval == 0)

    def reason(self) -> str:
        return f"{self.stopper.signal_name} received" if self.stopping else "exit_interval reached"

    def summary(self) -> dict[str, Any]:
        return {"stopped_by": self.stopper.signal_name if self.stopping else None}


class Checkpoint(PeriodicComponent):
    """Every `train.checkpoint_interval` steps, at the last step, before an exit, and whenever a component
    that evaluates the checkpoint (`needs_checkpoint`) is due."""

    name = "checkpoint"

    def __init__(self, cfg: RunConfig, stores: dict[str, Any], stop: StopRequest) -> None:
        super().__init__(cfg.train.checkpoint_interval, cfg.train.steps)
        self.cfg, self.stores, self.stop = cfg, stores, stop  # stores: what saves its state into every checkpoint
        self.readers: list[PeriodicComponent] = []  # the components that need this step's checkpoint
        self.directory = cfg.run_path / "checkpoints"

    def due(self, step: int) -> bool:
        return super().due(step) or self.stop.exiting or any(reader.due(step) for reader in self.readers)

    def run(self, state: TrainState) -> None:
        engine = state.pm.engine
        if not weights_finite(engine.module):  # never reached through the guard; a last line of defence
            raise NonFiniteStop(state.step, "weights", "found before writing the checkpoint")
        try:
            save_checkpoint(engine, self.directory, state.step, state.world.rank, self.stores,
                            keep=self.cfg.train.keep_checkpoints,
                            files={"config.yaml": config_text(self.cfg)})  # what wrote it: resuming compares
        except OSError as error:  # a full disk, a folder made read-only or removed under the run
            raise RunFailure(f"step {state.step}: cannot write checkpoint {error.filename or self.directory}: "
                             f"{error.strerror or error}") from error

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.directory / (read_latest(self.directory) or ""))}


class OutlierEvaluation(PeriodicComponent):
    """Every `eval.outlier_interval` steps: outliers.periodic's evaluation of the checkpoint just written
    (outlier statistics, FP and W8A8 metrics; outliers.json next to it)."""

    name = "outliers"
    needs_checkpoint = True

    def __init__(self, evaluation: PeriodicOutlierEval) -> None:
        super().__init__(evaluation.interval, evaluation.cfg.train.steps)
        self.evaluation = evaluation

    def run(self, state: TrainState) -> None:
        state.say(self.evaluation.run(state.pm.full_state_dict(), state.step, state.step_dir(), state.device))

    def summary(self) -> dict[str, Any]:
        return self.evaluation.summary()


class LmEvaluation(PeriodicComponent):
    """Every `eval.lm_eval_interval` steps: the lm-evaluation-harness on the checkpoint just written."""

    name = "lm_eval"
    needs_checkpoint = True

    def __init__(self, cfg: RunConfig, metrics: MetricsLogger, is_main: bool) -> None:
        super().__init__(cfg.eval.lm_eval_interval, cfg.train.steps)
        self.evaluation = PeriodicLmEval(cfg, metrics, is_main=is_main)

    def run(self, state: TrainState) -> None:
        state.say(self.evaluation.run(state.step, state.step_dir(), state.device))


class TestEvaluation(PeriodicComponent):
    """Once, at the end of a completed run: the family's metrics on its held-out test split (kind "test")."""

    name = "test"

    def __init__(self, cfg: RunConfig, spec: FamilySpec) -> None:
        super().__init__(None, cfg.train.steps)
        self.spec = spec
        self.values: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return step == self.last_step

    def run(self, state: TrainState) -> None:
        if state.data.test is not None:
            self.values = state.evaluate(state.data.test)
            state.metrics.log(state.step, "test", self.values)

    def finish(self, state: TrainState) -> None:
        if not self.values and state.failure is None and state.step >= self.last_step:  # resumed at the end
            self.run(state)

    def summary(self) -> dict[str, Any]:
        if not self.values:
            return {}
        return {"test_loss": self.values.get("loss"), **{f"test_{m.name}": self.values.get(m.name)
                                                        for m in self.spec.metrics}}


class MetricsWriters(PeriodicComponent):
    """After every step, once every other component ran: the scalars of the records they logged go to TensorBoard
    and W&B (launcher/metrics.py's writers; metrics.jsonl has them already); at the end the writers are closed
    (a failed run finishes its W&B run as failed). The outlier evaluation's figures, histograms and tables go
    to the writers directly, at its step."""

    name = "writers"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(1, cfg.train.steps)

    def run(self, state: TrainState) -> None:
        state.metrics.write_pending()

    def finish(self, state: TrainState) -> None:
        state.metrics.close_writers(exit_code=1 if state.failure is not None else 0)


def loop_components(state: TrainState, stopper: GracefulStop, stores: dict[str, Any], rates: Rates,
                    extra: list[PeriodicComponent]) -> tuple[list[PeriodicComponent], StopRequest]:
    """The built-in components in loop order, then `extra` (a family's or the user's), and the stop request
    the loop asks whether to end early. `stores`: what saves its state into every checkpoint; `rates`: the train
    log's throughput."""
    cfg, world = state.cfg, state.world
    stop = StopRequest(cfg, stopper)
    checkpoint = Checkpoint(cfg, stores, stop)
    outliers = PeriodicOutlierEval.create(cfg, state.data.validation, state.metrics, is_main=world.is_main,
                                          world_size=world.world_size)
    components: list[PeriodicComponent] = [
        TrainLog(cfg, rates), Validation(cfg, state.spec), stop, checkpoint,
        *([OutlierEvaluation(outliers)] if outliers is not None else []),
        *([LmEvaluation(cfg, state.metrics, world.is_main)] if cfg.eval.lm_eval_tasks else []),
        TestEvaluation(cfg, state.spec), *extra, MetricsWriters(cfg)]  # the writers last: every record of the step
    checkpoint.readers = [component for component in components if component.needs_checkpoint]
    return components, stop
