"""Non-finite training steps: never apply such an update, agree over all ranks, then stop or skip.

An update whose gradients hold inf/NaN is never applied. DeepSpeed's ZeRO, bf16 and fp16 optimizers skip it
themselves (they set `optimizer.overflow`; the engine then leaves the LR scheduler alone and counts
`skipped_steps`, the fp16 loss-scaling path). The plain optimizer DeepSpeed steps with ZeRO-0 in fp32 has no
such check: `skip_nonfinite_updates` gives it one. `NonFiniteGuard` then applies `train.nonfinite`: `stop` at the first such step
(default), or `skip` it and go on, as fp16 loss scaling does, up to `train.max_nonfinite_skips` consecutive
skipped steps. Weights therefore stay finite and no checkpoint of non-finite weights is ever written.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.distributed as dist

class RunFailure(Exception):
    """Training cannot go on (non-finite numbers, out of memory, unwritable checkpoint): one line, exit 1.

    `agreed`: every rank raises it at the same step, so only rank 0 needs to print it."""

    agreed = False


class NonFiniteStop(RunFailure):
    agreed = True

    def __init__(self, step: int, what: str, reason: str) -> None:
        self.step, self.what = step, what
        super().__init__(f"step {step}: non-finite {what}; the update was not applied and no checkpoint of it "
                         f"was written ({reason})")


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of `flags` over every rank (a collective when a process group runs)."""
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.cpu().tolist()]


def tensors_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one reduction, one host sync)."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)))


def weights_finite(module: torch.nn.Module) -> bool:
    """All ranks agree whether every parameter of every rank's shard is finite (checked before a checkpoint)."""
    # ZeRO-3 keeps each rank's share in `ds_tensor` (the parameter itself is an empty placeholder).
    shards = (getattr(p, "ds_tensor", p) for p in module.parameters())
    return not any_rank([not tensors_finite(shards)])[0]


def skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer.step()` a no-op whenever any rank holds a non-finite gradient, and say so in
    `optimizer.overflow`, which DeepSpeed's engine reads to leave the LR scheduler alone.

    A step pre-hook (registered last, so it sees the gradients other hooks clipped) drops every gradient:
    torch optimizers skip parameters without one entirely (no moment, step-count or weight-decay update)."""
    optimizer.overflow = False  # type: ignore[attr-defined]

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = getattr(opt, "_global_grad_norm", None)
        if norm is not None:  # parallel/grad_clip.py's hook ran first: its global norm is inf on every rank
            opt.overflow = not math.isfinite(norm)  # type: ignore[attr-defined]
        else:
            opt.overflow = any_rank([not tensors_finite(p.grad for p in params)])[0]  # type: ignore[attr-defined]
        if opt.overflow:  # type: ignore[attr-defined]
            for param in params:
                param.grad = None

    optimizer.register_step_pre_hook(before_step)


class NonFiniteGuard:
    """Applies `train.nonfinite` to each step's loss, gradient norm and the optimizer's skip flag."""

    def __init__(self, policy: str, max_skips: int, *, loss_scaled: bool = False) -> None:
        self.policy, self.max_skips = policy, max_skips
        # fp16 loss scaling skips overflowing updates as a matter of course: only the loss counts there.
        self.loss_scaled = loss_scaled
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float | None, update_skipped: bool) -> str | None:
        """None for a good step; a description of a skipped one. Raises NonFiniteStop when the run must stop.

        A collective: all ranks call it every step and reach the same verdict."""
        bad_loss, bad_norm, skipped = any_rank([
            not math.isfinite(loss),
            not self.loss_scaled and grad_norm is not None and not math.isfinite(grad_norm),
            not self.loss_scaled and update_skipped,
        ])
        if not (bad_loss or bad_norm or skipped):
            self.consecutive = 0
            return None
        parts = ([f"training loss ({loss})"] if bad_loss else []) + \
                ([f"gradient norm ({grad_norm})"] if bad_norm else [])
        # The numbers are this rank's (rank 0 prints them); another rank may be the one that saw inf/NaN.
        what = " and ".join(parts) or "gradient (the optimizer skipped the update)"
        self.consecutive += 1
        self.skipped += 1
        if self.policy == "stop":
            raise NonFiniteStop(step, what, "train.nonfinite=stop; lower train.lr, or set train.nonfinite=skip")
        if self.consecutive > self.max_skips:
            raise NonFiniteStop(step, what, f"{self.consecutive} consecutive non-finite steps exceed "
                                f"train.max_nonfinite_skips={self.max_skips}")
        return what
