"""The one collective every package needs outside a training step: wait for all ranks (a no-op alone)."""

from __future__ import annotations


def barrier() -> None:
    import torch.distributed as dist  # here, not at the top: launcher.slurm imports this before torch is needed

    if dist.is_initialized():
        dist.barrier()
