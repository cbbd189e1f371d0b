"""Graceful stop: SIGTERM / SIGUSR1 / SIGUSR2 (preemption, Slurm `--signal=USR1@T`, submitit's timeout) make
the trainer finish its current step, save a checkpoint and exit cleanly.

The handler only records the signal; the loop polls `should_stop()` at step boundaries, where every
rank agrees (max over ranks) so all of them checkpoint the same step. A handler that was installed
before ours (e.g. submitit's, which requeues the job) is called once the trainer returned normally.

One handler per process, installed as early as possible: `launcher/pretrain.py` run as a program calls
`GracefulStop.install()` before its imports, so a signal during imports, data preparation, the process
group or DeepSpeed's op build (seconds to minutes) is recorded instead of killing the rank (Python's default
for SIGUSR1 and SIGTERM), and the loop stops after its first step. That handler stays for the process's
life: a signal during shutdown is harmless too. In-process callers use `GracefulStop.installed()`, which
restores the previous handlers afterwards. This module imports no torch (it runs first).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator

# SIGUSR2 is submitit's time-limit signal; its own handler (requeue) runs after our checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class GracefulStop:
    _current: GracefulStop | None = None  # the process's handler, if one is installed

    @classmethod
    def install(cls) -> GracefulStop:
        """The installed handler, or a new one for the rest of the process's life."""
        if cls._current is None:
            cls._current = cls()
        return cls._current

    @classmethod
    @contextmanager
    def installed(cls) -> Iterator[GracefulStop]:
        """The installed handler, or one for the duration of the block: afterwards the previous handlers are
        back, and a signal received meanwhile is passed on to them if the block returned normally."""
        if cls._current is not None:
            yield cls._current
            return
        stopper = cls._current = cls()
        try:
            yield stopper
        except BaseException:
            stopper.restore(pass_on=False)  # a crash is not a stop: e.g. submitit must not requeue it
            raise
        stopper.restore()

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
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self, pass_on: bool = True) -> None:
        """Reinstall the previous handlers and (pass_on) hand them the signal we swallowed."""
        if GracefulStop._current is self:
            GracefulStop._current = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        previous_handlers, self._previous = self._previous, {}  # restoring twice is a no-op
        if pass_on and self.received is not None:
            previous = previous_handlers.get(self.received)
            if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
                handler: Callable[[int, FrameType | None], Any] = previous
                handler(self.received, self._frame)
