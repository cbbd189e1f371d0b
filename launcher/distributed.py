"""Process-group setup shared by `python -m launcher.pretrain`, `deepspeed` and `torchrun` launches."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """Rank layout as the launcher set it (deepspeed/torchrun export RANK etc.); one process otherwise.

    Readable before any process group exists, so validation can shard data without communicating.
    """
    return WorldInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group() -> torch.device:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on CUDA) and pick this rank's device."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m launcher.pretrain`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
