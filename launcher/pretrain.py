"""Pretrain an OPT or BERT model: `python -m launcher.pretrain --config configs/opt_tiny.yaml [--set k=v ...]`.

Also runs unchanged under `deepspeed --num_gpus N launcher/pretrain.py ...` and `torchrun` (data
parallel with ZeRO stage `parallel.zero_stage`). DeepSpeed carries the optimizer step, gradient
accumulation and clipping, ZeRO sharding, mixed precision and checkpoint files; this loop only feeds
batches, evaluates, logs and decides when to checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: an early SIGUSR1/SIGTERM is recorded, not fatal
    from launcher.signals import GracefulStop

    GracefulStop.install()

import argparse
import contextlib
import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoint.resume import check_resume_config, resume_point
from checkpoint.runlock import RunDirInUse, RunLock
from checkpoint.store import DATA, PARALLEL, last_checkpoint_note, load_checkpoint, read_latest, save_checkpoint, step_tag
from data_pipeline.cache_rollback import remove_new_cache_files_on_error
from launcher.config import RunConfig, config_text, load_config, save_config
from launcher.distributed import WorldInfo, close_process_group, init_process_group, world_from_env
from launcher import json_safe
from launcher.hf_checkpoint import init_state
from launcher.metrics import MetricsLogger
from launcher.nonfinite import NonFiniteGuard, NonFiniteStop, RunFailure, any_rank, skip_nonfinite_updates, weights_finite
from launcher.preflight import preflight
from launcher.quiet import quiet_library_noise
from launcher.schedule import build_scheduler, retarget_scheduler
from launcher.signals import GracefulStop
from launcher.slurm import slurm_attempt
from launcher.throughput import peak_tflops, throughput_metrics
from model.attention import resolve_backend
from common.cli import ArgumentParser, run_command
from common.errors import ConfigError, ProjectError
from model.family import FamilyData, FamilySpec, family_of
from parallel.layout import Layout, validate_layout
from outliers.periodic import PeriodicOutlierEval, check_config as check_outlier_config

log = logging.getLogger("launcher.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/opt_tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the run's latest checkpoint if there is one; "
                             "a checkpoint path; or 'none' (default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass
class Prepared:
    """Everything checked and loaded before any process group starts."""

    cfg: RunConfig
    world: WorldInfo
    spec: FamilySpec  # the model family (model/family.py): data, batches, metrics
    data: FamilyData  # this rank's resumable training stream and validation examples
    grad_accumulation: int
    resume_from: tuple[Path, str] | None
    changed_on_resume: dict[str, tuple[Any, Any]]  # config keys that differ from the checkpoint's: (old, new)
    layout: Layout
    initial_state: dict[str, torch.Tensor] | None  # train.init_from weights, read and checked once


def prepare(cfg: RunConfig, world: WorldInfo, resume: str) -> Prepared:
    """Validate everything that depends on files or the world size; raises ProjectError on bad input."""
    preflight(cfg)
    layout = validate_layout(cfg.model, tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                             zero_stage=cfg.parallel.zero_stage, world_size=world.world_size,
                             micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size)
    # megatron-core / DeepSpeed rank order: tensor innermost, then data, pipeline outermost.
    dp_rank = (world.rank // layout.tensor) % layout.data
    check_outlier_config(cfg)
    resume_from, note = resume_point(cfg.run_path, resume, world.world_size)
    if note and world.is_main:  # e.g. the newest checkpoint is damaged and an older one is used
        print(f"note: {note}", file=sys.stderr, flush=True)
    defaults = RunConfig().to_dict()  # what a key the saved config lacks meant when it was written
    changed = check_resume_config(resume_from, cfg.to_dict(), defaults) if resume_from is not None else {}
    initial_state = init_state(cfg.train.init_from, cfg) if cfg.train.init_from and resume_from is None else None
    spec = family_of(cfg.model)
    # A bad data file leaves no cache behind (text families cache tokenizers and corpora under data.cache_dir).
    cache_dir = getattr(cfg.data, "cache_dir", None)
    with remove_new_cache_files_on_error(cache_dir) if cache_dir else contextlib.nullcontext():
        data = spec.data(cfg, dp_rank=dp_rank, dp_world=layout.data)
    grad_accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data)
    return Prepared(cfg, world, spec, data, grad_accumulation, resume_from, changed, layout, initial_state)


def deepspeed_config(cfg: RunConfig, world: WorldInfo, grad_accumulation: int, bf16: bool) -> dict[str, Any]:
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


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def train(prep: Prepared) -> dict[str, Any]:
    from tqdm.auto import tqdm

    # Imported here, not at the top: megatron-core and DeepSpeed take seconds to import and print warnings,
    # and bad input is rejected before any of that.
    from parallel.engine import build_parallel_model, eval_loss, train_step

    cfg, world = prep.cfg, prep.world
    device = init_process_group(world)
    take_run_lock(cfg.run_path, world)  # before anything in the run directory is written
    torch.manual_seed(cfg.train.seed)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    layout = prep.layout
    initial = prep.initial_state
    pm = build_parallel_model(
        cfg.model, layout, seq_length=prep.spec.example_length(cfg), seed=cfg.train.seed,
        initial_state=initial, initial_source=f"train.init_from {cfg.train.init_from}",
        ds_config=deepspeed_config(cfg, world, prep.grad_accumulation, bf16),
        make_optimizer=lambda module: build_optimizer(module, cfg),
        make_scheduler=lambda optimizer: build_scheduler(
            optimizer, lr=cfg.train.lr, min_lr=cfg.train.min_lr, warmup_steps=cfg.train.warmup_steps,
            total_steps=cfg.train.steps, schedule=cfg.train.lr_schedule),
        partition_method=cfg.parallel.partition_method,
        activation_checkpointing=cfg.parallel.activation_checkpointing)
    engine = pm.engine
    if not hasattr(engine.optimizer, "overflow"):  # DeepSpeed's ZeRO/bf16/fp16 optimizers skip inf/NaN themselves
        skip_nonfinite_updates(engine.optimizer)
    run_path, checkpoint_dir = cfg.run_path, cfg.run_path / "checkpoints"
    components = {DATA: prep.data.train, PARALLEL: pm}  # what saves its own state into every checkpoint
    step = 0
    if prep.resume_from is not None:  # before anything in the run directory changes
        step = load_checkpoint(engine, *prep.resume_from, rank=world.rank, components=components)
        # This run's LR schedule and optimizer settings, not the checkpoint's (changing them on resume works).
        retarget_scheduler(engine.lr_scheduler, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                           betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps)
    if world.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_path / "config.yaml")  # what runs now, written once the run is known to be valid
    metrics = MetricsLogger(run_path, enabled=world.is_main, tensorboard=cfg.logging.tensorboard)
    outlier_eval = PeriodicOutlierEval.create(cfg, prep.data.validation, metrics, is_main=world.is_main,
                                              world_size=world.world_size)
    from launcher.periodic_lm_eval import PeriodicLmEval  # eval.lm_eval_tasks (issue 18)

    lm_evaluation = PeriodicLmEval.create(cfg, metrics, is_main=world.is_main)
    val_by_source = prep.data.validation_by_source  # a blend's per-source validation (issue 18)

    if prep.resume_from is not None:
        metrics.log(step, "event", {"resumed_from": str(prep.resume_from[0] / prep.resume_from[1])})
        if prep.changed_on_resume:
            metrics.log(step, "event", {"config_changed": {k: list(v) for k, v in prep.changed_on_resume.items()}})
            if world.is_main:
                print("resumed with changed settings: " + ", ".join(
                    f"{key} {old!r} -> {new!r}" for key, (old, new) in prep.changed_on_resume.items()), flush=True)
    elif initial is not None:
        metrics.log(step, "event", {"initialized_from": cfg.train.init_from})

    backend = resolve_backend(cfg.attention.backend, cfg.attention.variant, device)
    example_length = prep.spec.example_length(cfg)
    tokens_per_step = cfg.train.global_batch_size * example_length
    if world.is_main:
        print(f"model: {pm.num_parameters / 1e6:.2f}M parameters, attention {cfg.attention.variant} "
              f"({backend}{', gated' if cfg.attention.gated else ''}); {world.world_size} rank(s) as "
              f"{layout.describe()}, ZeRO-{cfg.parallel.zero_stage}, {'bf16' if bf16 else 'fp32'}, global batch "
              f"{cfg.train.global_batch_size} x {example_length} tokens", flush=True)
        if prep.spec.plannable:  # the planner models the text transformers
            from launcher.planner import run_plan_line  # launcher.plan's memory total of this layout (issue 18)

            print(run_plan_line(cfg, world.world_size, device.type), flush=True)

    def checkpoint(at_step: int) -> None:
        if not weights_finite(engine.module):  # never reached through the guard; a last line of defence
            raise NonFiniteStop(at_step, "weights", "found before writing the checkpoint")
        try:
            write_checkpoint(at_step)
        except OSError as error:  # a full disk, a folder made read-only or removed under the run
            raise RunFailure(f"step {at_step}: cannot write checkpoint {error.filename or checkpoint_dir}: "
                             f"{error.strerror or error}") from error

    def write_checkpoint(at_step: int) -> None:
        save_checkpoint(engine, checkpoint_dir, at_step, world.rank, components, keep=cfg.train.keep_checkpoints,
                        files={"config.yaml": config_text(cfg)})  # what wrote it: resuming compares against it

    batch_iter = prep.spec.train_batches(cfg, prep.data.train)  # with the family's batch augmentation (mixup)
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not (world.is_main and cfg.logging.progress),
                    desc=cfg.logging.run_name, unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 15.0)
    stopper = GracefulStop.install()  # main()'s (or the one installed before the imports when run as a program)
    flops_token = prep.spec.flops_per_example(cfg) / example_length  # FLOPs per token (patch, segment)
    peak = peak_tflops(cfg.logging.peak_tflops)
    start_time = time.perf_counter()
    start_step, window_start, window_loss, window_steps = step, time.perf_counter(), 0.0, 0
    last_train_loss = float("nan")
    val: dict[str, float] = {}
    stopping = False
    guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_skips, loss_scaled=cfg.train.precision == "fp16")
    failure: RunFailure | None = None
    while step < cfg.train.steps:
        step_lr = engine.get_lr()[0]
        step_loss, grad_norm = train_step(pm, batch_iter, prep.grad_accumulation, device)
        step += 1
        progress.update(1)
        try:  # all ranks agree; the optimizer has already refused a non-finite update
            skipped = guard.check(step, step_loss, grad_norm, bool(getattr(engine.optimizer, "overflow", False)))
        except NonFiniteStop as stop:
            failure, step = stop, step - 1  # `step` counts steps that ran; this one's update was not applied
            break
        if skipped is not None:
            metrics.log(step, "event", {"skipped_update": f"non-finite {skipped}"})
            if world.is_main:
                progress.write(f"step {step}: non-finite {skipped}; update skipped (train.nonfinite=skip)")
        else:
            window_loss += step_loss
            window_steps += 1
        if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
            last_train_loss = window_loss / window_steps if window_steps else float("nan")
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            record = {"loss": last_train_loss, "lr": step_lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "tokens_per_s": tokens_per_s, "tokens": step * tokens_per_step,
                      **throughput_metrics(tokens_per_s, flops_token, world.world_size, peak)}
            metrics.log(step, "train", record)
            progress.set_postfix(loss=f"{last_train_loss:.3f}", lr=f"{record['lr']:.2e}")
            window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        if step % cfg.eval.interval == 0 or step == cfg.train.steps:
            val = eval_loss(pm, prep.data.validation, cfg.train.micro_batch_size, device)
            metrics.log(step, "val", val)
            for name, blocks in val_by_source.items():  # metrics.jsonl kind "val/<source>", TensorBoard val/<source>/ppl
                source_val = eval_loss(pm, blocks, cfg.train.micro_batch_size, device)
                metrics.log(step, f"val/{name}", source_val)
                if world.is_main:
                    progress.write(f"step {step}: {name} {metric_text(prep.spec, source_val)}")
            if world.is_main:
                progress.write(f"step {step}: val loss {val['loss']:.4f}, {metric_text(prep.spec, val)}")
        stopping = stopper.should_stop()  # SIGTERM/SIGUSR1 on any rank: checkpoint this step, then exit
        exiting = stopping or (bool(cfg.train.exit_interval) and step % cfg.train.exit_interval == 0)
        outliers_due = outlier_eval is not None and outlier_eval.due(step)
        lm_eval_due = lm_evaluation is not None and lm_evaluation.due(step)
        if step % cfg.train.checkpoint_interval == 0 or step == cfg.train.steps or exiting or outliers_due \
                or lm_eval_due:
            try:
                checkpoint(step)
            except NonFiniteStop as stop:
                failure = stop
                break
        if outliers_due:  # evaluates the checkpoint just written; outliers.json goes next to it
            line = outlier_eval.run(pm.full_state_dict(), step, checkpoint_dir / step_tag(step), device)
            if line:
                progress.write(line)
        if lm_eval_due:  # the harness on the checkpoint just written; lm_eval.json goes next to it
            line = lm_evaluation.run(step, checkpoint_dir / step_tag(step), device)
            if line:
                progress.write(line)
        if exiting and step < cfg.train.steps:
            if world.is_main:
                reason = f"{stopper.signal_name} received" if stopping else "exit_interval reached"
                progress.write(f"step {step}: {reason}; checkpoint saved, continue with --resume auto")
            break
    progress.close()
    if not val and failure is None:  # resumed at or past the last step: still report where the model stands
        val = eval_loss(pm, prep.data.validation, cfg.train.micro_batch_size, device)
    test: dict[str, float] = {}
    if prep.data.test is not None and failure is None and step >= cfg.train.steps:  # held out: once, at the end
        test = eval_loss(pm, prep.data.test, cfg.train.micro_batch_size, device)
        metrics.log(step, "test", test)

    wall = time.perf_counter() - start_time
    trained_steps = step - start_step
    summary = {
        "run_name": cfg.logging.run_name, "steps": step, "completed": failure is None and step >= cfg.train.steps,
        "tokens": step * tokens_per_step,
        "train_loss": last_train_loss, "val_loss": val.get("loss"),
        **{f"val_{m.name}": val.get(m.name) for m in prep.spec.metrics}, **prep.spec.reference_values(cfg),
        **({"test_loss": test.get("loss"), **{f"test_{m.name}": test.get(m.name) for m in prep.spec.metrics}}
           if test else {}),
        "parameters": pm.num_parameters, "model_family": cfg.model.family, "objective": pm.family.objective,
        "attention_variant": cfg.attention.variant, "attention_backend": backend, "gated": cfg.attention.gated,
        "world_size": world.world_size, "layout": vars(layout), "zero_stage": cfg.parallel.zero_stage,
        "wall_time_s": wall, "tokens_per_s": trained_steps * tokens_per_step / wall if wall > 0 else None,
        "checkpoint": str(checkpoint_dir / (read_latest(checkpoint_dir) or "")),
        "stopped_by": "nonfinite" if isinstance(failure, NonFiniteStop) else stopper.signal_name if stopping else None,
        "error": str(failure) if failure is not None else None,
        "attempt": slurm_attempt(),  # which Slurm job attempt wrote this (requeue decisions trust only their own)
        **throughput_metrics(trained_steps * tokens_per_step / wall if wall > 0 else 0.0, flops_token,
                             world.world_size, peak),
        **(outlier_eval.summary() if outlier_eval is not None else {}),
    }
    if world.is_main:
        (run_path / "summary.json").write_text(json_safe.dumps(summary, indent=2) + "\n")
        print_summary(summary, run_path, prep.spec)
    metrics.close()
    RunLock.release_all()
    if failure is not None:  # after summary.json: main() prints the one line and exits non-zero
        raise failure
    return summary


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


def failure_line(error: Exception, cfg: RunConfig | None) -> str:
    """One line for an exception nobody turned into a user-facing error; the traceback goes to crash.log."""
    note = last_checkpoint_note(cfg.run_path / "checkpoints") if cfg is not None else "nothing was written"
    if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
        return (f"out of memory with train.micro_batch_size={cfg.train.micro_batch_size} and data.seq_length="
                f"{cfg.data.seq_length}: lower train.micro_batch_size (gradient accumulation keeps "
                f"train.global_batch_size={cfg.train.global_batch_size}), or spread the model over more devices "
                f"(parallel.tensor, parallel.pipeline with parallel.activation_checkpointing, parallel.zero_stage); "
                f"{note}") if cfg is not None else f"out of memory: {error}"
    where = ""
    if cfg is not None and cfg.run_path.is_dir():
        (cfg.run_path / "crash.log").write_text(traceback.format_exc())
        where = f" (traceback in {cfg.run_path / 'crash.log'})"
    return f"training failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}{where}; {note}"


def _number(value: float | None, spec: str) -> str:
    """A summary number, or "n/a" where none exists (no step logged yet, or a non-finite value)."""
    return format(value, spec) if value is not None and math.isfinite(value) else "n/a"


def metric_text(spec: FamilySpec, values: dict[str, Any], prefix: str = "val") -> str:
    """The family's metrics as text, e.g. "val ppl 12.34" or "val top-1 0.912"."""
    return ", ".join(f"{prefix} {m.summary_label or m.label} {_number(values.get(m.name), m.fmt)}"
                     for m in spec.metrics)


def print_summary(summary: dict[str, Any], run_path: Path, spec: FamilySpec) -> None:
    tps = summary["tokens_per_s"]
    metrics = {m.name: summary.get(f"val_{m.name}") for m in spec.metrics}
    quantized = {m.name: summary.get(f"w8a8_val_{m.name}") for m in spec.metrics}
    baseline = summary.get("uniform_ppl")
    lines = [
        f"== {summary['run_name']}: {summary['steps']} steps, {summary['tokens'] / 1e6:.2f}M tokens in "
        f"{_format_duration(summary['wall_time_s'])}" + (f" ({tps:,.0f} tokens/s)" if tps else "") + " ==",
        f"train loss {_number(summary['train_loss'], '.4f')} | val loss {_number(summary['val_loss'], '.4f')} | "
        + metric_text(spec, metrics).replace(", ", " | ") + (f" (uniform baseline {baseline:.0f})" if baseline else ""),
        *([f"{metric_text(spec, quantized, 'W8A8 val').replace(', ', ' | ')} | avg kurtosis "
           f"{summary['avg_kurtosis']:.2f} | max kurtosis {summary['max_kurtosis']:.2f} | max inf norm "
           f"{summary['max_inf_norm']:.2f} (outlier eval {summary['outlier_eval_s']:.1f}s)"]
          if summary.get("w8a8_val_loss") is not None else []),
        *([f"test loss {_number(summary['test_loss'], '.4f')} | " + metric_text(
            spec, {m.name: summary.get(f"test_{m.name}") for m in spec.metrics}, "test").replace(", ", " | ")]
          if "test_loss" in summary else []),
        f"attention {summary['attention_variant']} via {summary['attention_backend']}"
        f"{' + gate' if summary['gated'] else ''}, {summary['parameters'] / 1e6:.2f}M parameters",
        f"outputs: {run_path}/ (summary.json, metrics.jsonl, tb/, checkpoints/, config.yaml)",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    # Called as a function (tests, submitit), the stop handler lasts for the call; a signal received meanwhile
    # goes on to the previous handler afterwards (submitit's requeue). As a program it was installed above.
    with GracefulStop.installed():
        return run_command("launcher.pretrain", _main, argv)  # common/cli.py: bad flags, library log lines


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_noise()
    args = parse_args(argv)
    try:
        world = world_from_env()
        cfg = load_config(args.config, args.overrides)
        prep = prepare(cfg, world, args.resume)
        train(prep)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailure as failure:  # summary.json is written; every checkpoint on disk is intact
        if world.is_main or not failure.agreed:
            print(f"error: {failure}; {last_checkpoint_note(cfg.run_path / 'checkpoints')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: say where things stand instead of a traceback
        where = last_checkpoint_note(cfg.run_path / "checkpoints") if "cfg" in locals() else "nothing was written"
        print(f"error: interrupted (Ctrl-C); {where}", file=sys.stderr)
        return 130
    except Exception as error:  # an out-of-memory or a bug: one line here, the traceback in the run directory
        print(f"error: {failure_line(error, cfg if 'cfg' in locals() else None)}", file=sys.stderr)
        return 1
    finally:
        RunLock.release_all()  # a run that raised still holds it; the next in-process run must not be refused
        close_process_group()  # not left to exit-time destructors, which can abort a finished rank (exit 134)
    return 0


if __name__ == "__main__":
    sys.exit(main())
