"""The in-training hook: every `eval.outlier_interval` steps (and at the last step) evaluate the model as
`launcher.evaluate` would evaluate that step's checkpoint, and log the result.

Runs on rank 0 only, on a fresh fp32 single-process model built from the full state dict (the weights the
checkpoint holds, gathered over TP/PP ranks by the caller), with the whole validation set of
`eval.max_blocks` examples (`outliers.report.validation_examples`: the family's examples, MLM ones with the
fixed masks of data.mlm_eval_seed) and the calibration examples of `outliers.report.calibration_blocks`;
the other ranks wait at a barrier. Training's RNG streams are left untouched, so a run with and without this
evaluation trains identically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from common.distributed import barrier
from common.errors import ConfigError
from model.family import family_of
from outliers.report import (EvalSettings, calibration_blocks, evaluate_model, model_from_state, one_line,
                             validation_examples, write_result)

# Copied from the last evaluation into the run's summary.json, after the W8A8 loss and metrics.
OUTLIER_SUMMARY_KEYS = ("avg_kurtosis", "max_kurtosis", "max_inf_norm")


def check_config(cfg: Any) -> None:
    """Reject settings the periodic evaluation cannot serve (called before any process group starts)."""
    if cfg.eval.outlier_interval is not None and cfg.parallel.zero_stage == 3:
        raise ConfigError("eval.outlier_interval", cfg.eval.outlier_interval,
                          "needs whole weights on rank 0, which ZeRO-3 partitions (parallel.zero_stage=3); "
                          "set eval.outlier_interval=null and evaluate consolidated checkpoints instead")


class PeriodicOutlierEval:
    def __init__(self, cfg: Any, val_blocks: list[Any], metrics: Any, *, is_main: bool, world_size: int) -> None:
        self.cfg, self.metrics, self.is_main = cfg, metrics, is_main
        self.spec = family_of(cfg.model)
        self.interval: int = cfg.eval.outlier_interval
        self.settings = EvalSettings.from_config(cfg)
        self.last: dict[str, Any] | None = None
        self.seconds = 0.0  # total wall time spent here (the overhead on training)
        self.val_blocks: list[Any] = []
        self.calib_blocks: list[Any] = []
        if is_main:
            start = time.perf_counter()
            # With several ranks, val_blocks is this rank's shard: rank 0 evaluates the whole set. With one,
            # it is the whole set already (launcher.pretrain's eval_examples, as validation_examples reads it).
            self.val_blocks = val_blocks if world_size == 1 else validation_examples(cfg)
            self.calib_blocks = calibration_blocks(cfg)
            self.seconds += time.perf_counter() - start

    @classmethod
    def create(cls, cfg: Any, val_blocks: list[Any], metrics: Any, *, is_main: bool,
               world_size: int) -> PeriodicOutlierEval | None:
        if cfg.eval.outlier_interval is None:
            return None
        return cls(cfg, val_blocks, metrics, is_main=is_main, world_size=world_size)

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.cfg.train.steps

    def run(self, state_dict: dict[str, torch.Tensor], step: int, step_dir: Path, device: torch.device) -> str | None:
        """Evaluate, write `step_dir/outliers.json`, log; returns a one-line summary on rank 0.

        `state_dict` is the full (consolidated) model state on rank 0, as `ParallelModel.full_state_dict()`
        gives it for any layout; other ranks pass {} and only wait."""
        line = None
        if self.is_main:
            start = time.perf_counter()
            model = model_from_state(self.cfg, state_dict, device)
            evaluation = evaluate_model(model, self.val_blocks, self.calib_blocks, self.settings)
            result = {"step": step, **evaluation.to_dict()}
            write_result(step_dir, result)
            self.metrics.log(step, "outliers", evaluation.to_dict())
            from outliers.plots import log_tensorboard, outlier_table

            for writer in self.metrics.writers:  # TensorBoard and W&B get the same scalars, histogram and image
                log_tensorboard(writer, result, evaluation.worst_activations, step)
            if self.metrics.wandb is not None:
                self.metrics.wandb.add_table("outliers/modules", *outlier_table(result), step)
            self.last = result
            self.seconds += time.perf_counter() - start
            line = f"step {step}: {one_line(result, self.spec)} [{time.perf_counter() - start:.1f}s]"
        barrier()
        return line

    def summary(self) -> dict[str, Any]:
        keys = ["w8a8_val_loss", *(f"w8a8_val_{m.name}" for m in self.spec.metrics), *OUTLIER_SUMMARY_KEYS]
        values = {key: (self.last or {}).get(key) for key in keys}
        return {**values, "outlier_eval_s": self.seconds if self.is_main else None}
