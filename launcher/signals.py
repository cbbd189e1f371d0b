"""Graceful stop: SIGTERM / SIGUSR1 / SIGUSR2 (preemption, Slurm `--signal=USR1@T`, submitit's timeout) make
the trainer finish its current step, save a checkpoint and exit cleanly.

The handler only records the signal; the loop polls `should_stop()` at step boundaries, where every
rank agrees (max over ranks) so all of them checkpoint the same step. A handler that was installed
before ours (e.g. submitit's, which requeues the job) is called after the checkpoint is written.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist

# SIGUSR2 is submitit's time-limit signal; its own handler (requeue) runs after our checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class GracefulStop:
    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        self._frame: FrameType | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received, self._frame = signum, frame

    def should_stop(self) -> bool:
        """True on every rank once any rank received a stop signal (a collective: call on all ranks)."""
        flag = torch.tensor([1 if self.received is not None else 0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        """Reinstall the previous handlers and pass on the signal we swallowed (after checkpointing)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self.received is not None:
            previous = self._previous.get(self.received)
            if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
                handler: Callable[[int, FrameType | None], Any] = previous
                handler(self.received, self._frame)
