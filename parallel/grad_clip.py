"""The global gradient norm (and clipping by it) on DeepSpeed's plain-optimizer path: ZeRO-0 in fp32.

Why this exists: on that path DeepSpeed clips with `deepspeed.runtime.utils.clip_grad_norm_`, which counts
a parameter that is not tensor-parallel only on rank 0 of `mpu.get_model_parallel_group()`. Under a
pipeline that group spans every stage (tensor x pipeline ranks), so the replicated parameters of every
stage but the first are left out, and the tied embedding is counted on the first and the last stage. The
engine also records no norm there (`get_global_grad_norm()` is None). DeepSpeed's ZeRO, bf16 and fp16
optimizers get it right: they skip `ds_pipe_replicated` parameters (the tied copies DeepSpeed's
PipelineModule marks), count a replicated parameter only on tensor-parallel rank 0, sum the squares over
the model-parallel group, and publish the result as `optimizer._global_grad_norm`, which the engine
copies after every step. This module applies that same filter and DeepSpeed's own norm and clip
functions, as a pre-step hook on the plain optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import clip_tensors_by_global_norm, get_global_norm_of_tensors, is_model_parallel_parameter
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank


def uses_plain_optimizer(ds_config: dict[str, Any]) -> bool:
    """True when DeepSpeed steps the client optimizer itself (no ZeRO, bf16 or fp16 wrapper around it)."""
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    low_precision = any(ds_config.get(key, {}).get("enabled", False) for key in ("bf16", "fp16"))
    return zero == 0 and not low_precision


def grads_for_norm(params: list[torch.nn.Parameter], mpu: Any) -> list[torch.Tensor]:
    """This rank's share of the global norm: each gradient element of the whole model counted once."""
    tp_rank = bwc_tensor_model_parallel_rank(mpu=mpu)
    return [p.grad for p in params if p.grad is not None and not getattr(p, PIPE_REPLICATED, False)
            and (tp_rank == 0 or is_model_parallel_parameter(p))]


def _tensor_norm(grad: torch.Tensor) -> torch.Tensor:
    # torch's fp32 norm on CPU accumulates almost sequentially: on a 2M-element embedding gradient it is off
    # by ~2e-4 relative, which would make layouts that shard that tensor disagree. CUDA reduces in a tree
    # (accurate in fp32); on CPU accumulate in fp64.
    return torch.linalg.vector_norm(grad, dtype=torch.float32 if grad.is_cuda else torch.float64)


def global_grad_norm(params: list[torch.nn.Parameter], mpu: Any) -> float:
    """The single-process L2 norm of all gradients (a collective over the model-parallel group); inf if
    any gradient is non-finite."""
    # DeepSpeed's reduction over per-tensor norms: the norm of a scalar is itself, so this is its norm of
    # norms summed over the model-parallel group.
    norms = [_tensor_norm(g) for g in grads_for_norm(params, mpu)] or [torch.zeros(())]  # every rank joins
    norm = float(get_global_norm_of_tensors(norms, mpu=mpu))
    return norm if norm >= 0 and math.isfinite(norm) else float("inf")  # DeepSpeed marks non-finite as -1


def install_global_norm_clipping(optimizer: torch.optim.Optimizer, max_norm: float, mpu: Any) -> None:
    """Before every step: compute the global norm, clip to `max_norm` when > 0, publish it for the engine."""

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = global_grad_norm(params, mpu)
        opt._global_grad_norm = norm  # type: ignore[attr-defined]  # read by DeepSpeed's _take_model_step
        if max_norm > 0 and math.isfinite(norm):  # a non-finite norm is reported, never used to scale
            clip_tensors_by_global_norm([p.grad for p in params if p.grad is not None], max_norm=max_norm,
                                        global_norm=norm)

    optimizer.register_step_pre_hook(before_step)
