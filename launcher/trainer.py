"""The training loop: build the parallel model and the periodic components for a prepared run, then train
step by step; after each step every component that is due runs (launcher/periodic.py, launcher/components.py).

DeepSpeed carries the optimizer step, gradient accumulation and clipping, ZeRO sharding, mixed precision and
checkpoint files; the loop only feeds batches and keeps the non-finite guard, the components do the rest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from checkpoint.runlock import RunDirInUse, RunLock
from checkpoint.store import DATA, PARALLEL, load_checkpoint
from launcher import json_safe
from launcher.components import Rates, loop_components
from launcher.config import RunConfig, save_config
from launcher.distributed import WorldInfo, init_process_group
from launcher.metrics import MetricsLogger
from launcher.nonfinite import NonFiniteGuard, NonFiniteStop, any_rank, skip_nonfinite_updates
from launcher.periodic import PeriodicComponent, TrainState
from launcher.schedule import build_scheduler, retarget_scheduler
from launcher.signals import GracefulStop
from launcher.slurm import slurm_attempt
from launcher.summary import print_summary
from launcher.throughput import peak_tflops, throughput_metrics
from model.attention import resolve_backend
from model.family import FamilyData, FamilySpec
from parallel.layout import Layout


@dataclass
class Prepared:
    """Everything checked and loaded before any process group starts (launcher.pretrain.prepare)."""

    cfg: RunConfig
    world: WorldInfo
    spec: FamilySpec  # the model family (model/family.py): data, batches, metrics
    data: FamilyData  # this rank's resumable training stream and validation examples
    grad_accumulation: int
    resume_from: tuple[Path, str] | None
    changed_on_resume: dict[str, tuple[Any, Any]]  # config keys that differ from the checkpoint's: (old, new)
    layout: Layout
    initial_state: dict[str, torch.Tensor] | None  # train.init_from weights, read and checked once
    periodic: Sequence[PeriodicComponent] = ()  # train.periodic's components, made and checked in prepare


def deepspeed_config(cfg: RunConfig, world: WorldInfo, grad_accumulation: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config for this run (`world`: unused, kept for callers that pass it)."""
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
        "steps_per_print": 10**9,  # this loop does the logging
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # nanoGPT's rule: matrices (incl. embeddings) decay; biases, norms, gate biases and sink logits do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps)


def take_run_lock(run_path: Path, world: WorldInfo) -> None:
    """Rank 0 locks the run directory for this run's lifetime; every rank stops when it cannot."""
    refusal: RunDirInUse | None = None
    if world.is_main:
        try:
            RunLock(run_path).acquire()
        except RunDirInUse as error:
            refusal = error
    if any_rank([refusal is not None])[0]:
        raise refusal or RunDirInUse(f"run directory {run_path} is in use by another run")


class Trainer:
    """One run: `Trainer(prep).fit()` trains to `train.steps` (or a stop) and returns the summary. `extra`
    components run after the built-in ones and `prep.periodic` (train.periodic)."""

    def __init__(self, prep: Prepared, extra: Sequence[PeriodicComponent] = ()) -> None:
        # Imported here: megatron-core and DeepSpeed take seconds to import and print warnings, and bad input
        # is rejected before any of that. The module, not its function: tests replace engine.train_step.
        import parallel.engine as parallel_engine

        self.prep, self.cfg, self.world, self.parallel_engine = prep, prep.cfg, prep.world, parallel_engine
        self.device = init_process_group(prep.world)
        take_run_lock(self.cfg.run_path, self.world)  # before anything in the run directory is written
        torch.manual_seed(self.cfg.train.seed)
        self.bf16 = self.cfg.train.precision == "bf16" or (self.cfg.train.precision == "auto"
                                                             and self.device.type == "cuda")
        self.pm = self._build_model()
        self.engine = self.pm.engine
        stores = {DATA: prep.data.train, PARALLEL: self.pm}  # what saves its own state into every checkpoint
        step = self._resume(stores)
        self.example_length = prep.spec.example_length(self.cfg)
        throughput = prep.spec.throughput  # what the family counts: tokens, images, windows
        per_example = throughput.per_example(self.cfg) if throughput.per_example else self.example_length
        self.rates = Rates(throughput.unit, self.cfg.train.global_batch_size * per_example,
                           prep.spec.flops_per_example(self.cfg) / per_example, peak_tflops(self.cfg.logging.peak_tflops))
        metrics = MetricsLogger(self.cfg.run_path, enabled=self.world.is_main, tensorboard=self.cfg.logging.tensorboard,
                                wandb=self.cfg.logging.wandb, config=self.cfg.to_dict(),
                                resuming=prep.resume_from is not None,  # a resumed run continues its W&B run
                                defer_writers=True)  # the MetricsWriters component writes them after each step
        self.state = TrainState(self.cfg, self.world, prep.spec, prep.data, self.pm, self.device, metrics,
                                progress=None, step=step, start_step=step)
        self.stopper = GracefulStop.install()  # main()'s (or the one installed before the imports as a program)
        self.components, self.stop = loop_components(self.state, self.stopper, stores, self.rates,
                                                     [*prep.periodic, *extra])
        self._log_start()
        self.backend = resolve_backend(self.cfg.attention.backend, self.cfg.attention.variant, self.device)
        self._banner()
        self.batches = prep.spec.train_batches(self.cfg, prep.data.train)  # with the family's augmentation (mixup)
        self.guard = NonFiniteGuard(self.cfg.train.nonfinite, self.cfg.train.max_nonfinite_skips,
                                    loss_scaled=self.cfg.train.precision == "fp16")

    def fit(self) -> dict[str, Any]:
        """Step, log, then every periodic component that is due; until the last step, a stop or a failure."""
        state, last_step = self.state, self.cfg.train.steps
        state.progress = tqdm(total=last_step, initial=state.step, desc=self.cfg.logging.run_name, unit="step",
                              disable=not (self.world.is_main and self.cfg.logging.progress), dynamic_ncols=True,
                              mininterval=1.0 if sys.stderr.isatty() else 15.0)
        start_time = time.perf_counter()
        while state.step < last_step:
            if not self._train_step():
                break
            try:
                for component in self.components:
                    if component.due(state.step):
                        component.run(state)
            except NonFiniteStop as stop:  # the checkpoint found non-finite weights
                state.failure = stop
                break
            if self.stop.exiting and state.step < last_step:
                state.say(f"step {state.step}: {self.stop.reason()}; checkpoint saved, continue with --resume auto")
                break
        state.progress.close()
        for component in self.components:
            component.finish(state)
        summary = self._summary(time.perf_counter() - start_time)
        if self.world.is_main:
            (self.cfg.run_path / "summary.json").write_text(json_safe.dumps(summary, indent=2) + "\n")
            print_summary(summary, self.cfg.run_path, self.prep.spec)
        state.metrics.close(exit_code=1 if state.failure is not None else 0)
        RunLock.release_all()
        if state.failure is not None:  # after summary.json: main() prints the one line and exits non-zero
            raise state.failure
        return summary

    def _train_step(self) -> bool:
        """One optimizer step; False when the non-finite guard stops the run (its update was not applied)."""
        state = self.state
        state.lr = self.engine.get_lr()[0]
        loss, state.grad_norm = self.parallel_engine.train_step(self.pm, self.batches, self.prep.grad_accumulation,
                                                                self.device)
        state.step += 1
        state.progress.update(1)
        if note := self.pm.compile_note():  # train.compile: what compiling cost, once
            state.say(note)
        try:  # all ranks agree; the optimizer has already refused a non-finite update
            overflow = bool(getattr(self.engine.optimizer, "overflow", False))
            skipped = self.guard.check(state.step, loss, state.grad_norm, overflow)
        except NonFiniteStop as stop:
            state.failure, state.step = stop, state.step - 1  # `step` counts steps that ran
            return False
        if skipped is None:
            state.window.add(loss)
            return True
        state.metrics.log(state.step, "event", {"skipped_update": f"non-finite {skipped}"})
        state.say(f"step {state.step}: non-finite {skipped}; update skipped (train.nonfinite=skip)")
        return True

    def _summary(self, wall: float) -> dict[str, Any]:
        """summary.json: the run's facts, then what each component reports."""
        cfg, state, world = self.cfg, self.state, self.world
        failure, rates = state.failure, self.rates
        per_s = (state.step - state.start_step) * rates.per_step / wall if wall > 0 else None
        reported = {key: value for component in self.components for key, value in component.summary().items()}
        return {
            "run_name": cfg.logging.run_name, "steps": state.step,
            "completed": failure is None and state.step >= cfg.train.steps,
            rates.unit: state.step * rates.per_step, **reported,
            "parameters": self.pm.num_parameters, "model_family": cfg.model.family,
            "objective": self.pm.family.objective.name, "attention_variant": cfg.attention.variant,
            "attention_backend": self.backend, "gated": cfg.attention.gated, "world_size": world.world_size,
            "layout": vars(self.prep.layout), "zero_stage": cfg.parallel.zero_stage,
            "wall_time_s": wall, f"{rates.unit}_per_s": per_s,
            "stopped_by": "nonfinite" if isinstance(failure, NonFiniteStop) else reported.get("stopped_by"),
            "error": str(failure) if failure is not None else None,
            "attempt": slurm_attempt(),  # which Slurm job attempt wrote this (requeue decisions trust only their own)
            **throughput_metrics(per_s or 0.0, rates.flops_per_unit, world.world_size, rates.peak),
        }

    def _build_model(self) -> Any:
        cfg, prep = self.cfg, self.prep
        pm = self.parallel_engine.build_parallel_model(
            cfg.model, prep.layout, seq_length=prep.spec.example_length(cfg), seed=cfg.train.seed,
            initial_state=prep.initial_state, initial_source=f"train.init_from {cfg.train.init_from}",
            ds_config=deepspeed_config(cfg, self.world, prep.grad_accumulation, self.bf16),
            make_optimizer=lambda module: build_optimizer(module, cfg),
            make_scheduler=lambda optimizer: build_scheduler(
                optimizer, lr=cfg.train.lr, min_lr=cfg.train.min_lr, warmup_steps=cfg.train.warmup_steps,
                total_steps=cfg.train.steps, schedule=cfg.train.lr_schedule),
            partition_method=cfg.parallel.partition_method,
            activation_checkpointing=cfg.parallel.activation_checkpointing, compile=cfg.train.compile)
        if not hasattr(pm.engine.optimizer, "overflow"):  # DeepSpeed's ZeRO/bf16/fp16 optimizers skip inf/NaN
            skip_nonfinite_updates(pm.engine.optimizer)
        return pm

    def _resume(self, stores: dict[str, Any]) -> int:
        """The step to start from: the checkpoint's when resuming (before anything in the run directory
        changes), else 0; then this run's config.yaml."""
        cfg, step = self.cfg, 0
        if self.prep.resume_from is not None:
            step = load_checkpoint(self.engine, *self.prep.resume_from, rank=self.world.rank, components=stores)
            # This run's LR schedule and optimizer settings, not the checkpoint's (changing them on resume works).
            retarget_scheduler(self.engine.lr_scheduler, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps)
        if self.world.is_main:
            cfg.run_path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, cfg.run_path / "config.yaml")  # what runs now, written once the run is known valid
        return step

    def _log_start(self) -> None:
        """Events: where the weights came from and which settings changed on resume."""
        prep, metrics, step = self.prep, self.state.metrics, self.state.step
        if prep.resume_from is not None:
            metrics.log(step, "event", {"resumed_from": str(prep.resume_from[0] / prep.resume_from[1])})
            if prep.changed_on_resume:
                metrics.log(step, "event", {"config_changed": {k: list(v) for k, v in prep.changed_on_resume.items()}})
                if self.world.is_main:
                    print("resumed with changed settings: " + ", ".join(
                        f"{key} {old!r} -> {new!r}" for key, (old, new) in prep.changed_on_resume.items()), flush=True)
        elif prep.initial_state is not None:
            metrics.log(step, "event", {"initialized_from": self.cfg.train.init_from})

    def _banner(self) -> None:
        cfg, world = self.cfg, self.world
        if not world.is_main:
            return
        print(f"model: {self.pm.num_parameters / 1e6:.2f}M parameters, attention {cfg.attention.variant} "
              f"({self.backend}{', gated' if cfg.attention.gated else ''}); {world.world_size} rank(s) as "
              f"{self.prep.layout.describe()}, ZeRO-{cfg.parallel.zero_stage}, {'bf16' if self.bf16 else 'fp32'}, "
              f"global batch {cfg.train.global_batch_size} x {self.example_length} tokens", flush=True)
        if self.prep.spec.cost_model() is not None:  # the planner models this family (the text transformers)
            from launcher.planner import run_plan_line  # launcher.plan's memory total of this layout (issue 18)

            print(run_plan_line(cfg, world.world_size, self.device.type), flush=True)
