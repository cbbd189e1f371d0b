"""Learning-rate schedule: linear warmup, then linear or cosine decay to min_lr (or constant)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr + (min_lr - lr) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                    total_steps: int, schedule: str) -> LambdaLR:
    # LambdaLR multiplies the optimizer's base lr (= lr) by the factor; DeepSpeed steps and checkpoints it.
    return LambdaLR(optimizer, lambda step: lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                                                  total_steps=total_steps, schedule=schedule) / lr)


def retarget_scheduler(scheduler: LambdaLR, *, lr: float, weight_decay: float, betas: tuple[float, float],
                       eps: float) -> None:
    """After a checkpoint load, make the run's config what the optimizer uses.

    The checkpoint restores the old base LR (LambdaLR.base_lrs, param_groups' initial_lr) and the old
    optimizer hyperparameters; the schedule function is this run's. Only the step count is kept."""
    scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
    for index, (group, factor) in enumerate(zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
        group["betas"], group["eps"] = betas, eps
        if index == 0:  # launcher.trainer.build_optimizer: matrices decay; the second group (biases, norms) never
            group["weight_decay"] = weight_decay
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr reports
