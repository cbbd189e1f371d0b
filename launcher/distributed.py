"""Process-group setup shared by `python -m launcher.pretrain`, `deepspeed`, `torchrun` and `srun` launches.

Where the rank layout comes from, in this order:
1. RANK / WORLD_SIZE / LOCAL_RANK set by a launcher (deepspeed's local launch, torchrun, submitit's TrainJob);
2. inside an `srun` step (SLURM_STEP_ID is set): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, with
   MASTER_ADDR the step's first node and MASTER_PORT derived from the job id (DeepSpeed's `--launcher
   slurm` runs `srun -n N python script.py` and exports none of the torch variables);
3. otherwise a world of one, which a Slurm job with more than one task refuses (the other tasks' share of
   the allocation would sit idle while this process trains alone).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from common.distributed import barrier  # noqa: F401  (launcher modules import it from here)
from common.errors import ConfigError, ProjectError

if TYPE_CHECKING:  # torch is imported where it is used: launcher.slurm runs in the batch step, before any rank
    import torch


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str = "single process"  # who said so: "launcher (RANK/WORLD_SIZE)", "srun (SLURM_PROCID/...)"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],cpu5") as `scontrol show hostnames` prints it."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    if not hosts:
        raise ProjectError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return hosts


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A rendezvous port every node of the job computes alike: 10000-29999 (below Linux's ephemeral range),
    different for jobs sharing a node; MASTER_PORT wins when set."""
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    return 10000 + _int(env, "SLURM_JOB_ID") % 20000 if env.get("SLURM_JOB_ID") else 29500


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """Rank 0's host: srun places task 0 on the step's first node; MASTER_ADDR wins when set."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ProjectError("SLURM_JOB_NODELIST is not set: cannot tell rank 0's host (set MASTER_ADDR)")
    return expand_nodelist(nodelist)[0]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ProjectError(f"environment variable {name}={env.get(name)!r} is not an integer") from None


def world_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """This process's place in the world its launcher intended (see the module docstring).

    Readable before any process group exists, so validation can shard data without communicating.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return WorldInfo(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                         local_rank=int(env.get("LOCAL_RANK", 0)), source="launcher (RANK/WORLD_SIZE)")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        return WorldInfo(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, tasks),
                         local_rank=int(env.get("SLURM_LOCALID", 0)), source=f"srun (SLURM_PROCID/{tasks})")
    tasks = int(env.get("SLURM_NTASKS", 1) or 1)
    if tasks > 1:
        raise ProjectError(f"this Slurm job has SLURM_NTASKS={tasks} tasks but the trainer was started once, "
                           f"outside srun: start one rank per task with srun (as slurm/*.sh do) or submit "
                           f"with --ntasks=1")
    return WorldInfo(rank=0, world_size=1, local_rank=0)


# What torch.distributed's env:// rendezvous reads, and export_torch_env sets.
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def export_torch_env(world: WorldInfo, env: dict[str, str] | None = None) -> None:
    """Set what torch.distributed's env:// rendezvous reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    if world.source.startswith("srun"):
        env.update(MASTER_ADDR=slurm_master_addr(env), MASTER_PORT=str(slurm_master_port(env)))
    elif world.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(world: WorldInfo | None = None) -> torch.device:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on CUDA) and pick this rank's device.

    Stops with one line when the group's size differs from the world the launcher intended."""
    import deepspeed
    import torch
    import torch.distributed as dist

    world = world_from_env() if world is None else world
    export_torch_env(world)
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if dist.get_world_size() != world.world_size or dist.get_rank() != world.rank:
        raise ProjectError(f"process group has rank {dist.get_rank()} of {dist.get_world_size()} but the launcher "
                           f"intended rank {world.rank} of {world.world_size} ({world.source}): refusing to "
                           f"train in a different world")
    return device


def close_process_group() -> None:
    """Tear the group down before the interpreter exits. A gloo group left to the exit-time destructors can
    abort a rank ("terminate called without an active exception", exit 134): a finished or checkpointed run
    would then look like a crash to Slurm and to the requeue decision. Not a collective; a no-op without a group
    (and without importing torch on an early error path)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_device(flag: str, name: str) -> torch.device:
    """The device `name` (cpu, cuda, cuda:1, mps) names, if this machine has it; ConfigError naming `flag` if not."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(flag, name, "is not a device name (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(flag, name, "this machine has no CUDA device (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(flag, name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(flag, name, "this machine has no MPS device (use cpu)")
    elif device.type != "cpu":
        raise ConfigError(flag, name, "must be cpu, cuda or cuda:N")
    return device
