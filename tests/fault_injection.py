"""Run `launcher.pretrain` with one injected fault, for tests of what a run does when things go wrong.

    python tests/fault_injection.py FAULT STEP -- --config ... --set ...

FAULT, at optimizer step STEP (1-based):
    nan_loss     that step's loss is NaN (a transient blow-up: its gradients are NaN, the weights are not)
    nan_weights  a weight becomes NaN just before that step (a persistent blow-up)
    oom          the step runs out of accelerator memory (torch.OutOfMemoryError, as CUDA raises it)
    crash        the step raises an unexpected RuntimeError
    interrupt    Ctrl-C during the step (KeyboardInterrupt)
    unwritable   writing that step's checkpoint fails with PermissionError
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import parallel.engine  # noqa: E402
from launcher import pretrain  # noqa: E402


def inject(fault: str, at_step: int) -> None:
    real_train_step = parallel.engine.train_step
    calls = [0]

    def train_step(pm: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] != at_step:
            return real_train_step(pm, *args, **kwargs)
        module = pm.engine.module
        if fault == "nan_weights":
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")
        elif fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        elif fault == "crash":
            raise RuntimeError("injected failure inside the training step")
        elif fault == "interrupt":
            raise KeyboardInterrupt
        elif fault == "unwritable":
            real_save = pm.engine.save_checkpoint

            def save_checkpoint(save_dir: str, tag: str, **kw: Any) -> Any:
                if tag == f"step_{at_step}":
                    path = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_save(save_dir, tag=tag, **kw)

            pm.engine.save_checkpoint = save_checkpoint
        elif fault == "nan_loss":
            forward = module.forward
            module.forward = lambda *a, **k: forward(*a, **k) * float("nan")
            try:
                return real_train_step(pm, *args, **kwargs)
            finally:
                del module.forward
        return real_train_step(pm, *args, **kwargs)

    parallel.engine.train_step = train_step
    if hasattr(pretrain, "train_step"):  # older launcher/pretrain.py imported it at module level
        pretrain.train_step = train_step


if __name__ == "__main__":
    fault, at_step, separator, *pretrain_args = sys.argv[1:]
    assert separator == "--", __doc__
    inject(fault, int(at_step))
    sys.exit(pretrain.main(pretrain_args))
