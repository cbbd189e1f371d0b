"""Slurm glue for `slurm/*.sh`: the launch command for this allocation, and the requeue decision.

    python -m launcher.slurm command --config configs/opt_1b3.yaml [--set k=v ...]   # prints the command
    python -m launcher.slurm requeue-if-unfinished --status N --config configs/opt_1b3.yaml [--set ...]

`command` checks the config against the allocation's real world size (SLURM_NTASKS ranks) before anything
starts, writes DeepSpeed's hostfile (slots = tasks per node, so CPU partitions work), and prints
`env OMP_NUM_THREADS=.. MASTER_ADDR=.. MASTER_PORT=.. deepspeed --launcher slurm ...`; DeepSpeed runs
`srun -n N python launcher/pretrain.py`, whose ranks read their place from SLURM_PROCID etc.
(launcher/distributed.py). Kept in Python (not bash) so the logic is unit-tested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from launcher.config import RunConfig, load_config
from launcher.distributed import expand_nodelist, slurm_master_port
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from parallel.layout import validate_layout

__all__ = ["expand_nodelist", "launch_command", "requeue_decision", "slurm_attempt", "tasks_per_node"]

# A launch that died of one of these (exit 128 + signal) was stopped from outside, e.g. during the first
# moments of interpreter start-up, before launcher/signals.py could catch it: not a crash.
STOP_STATUSES = {128 + int(sig): sig.name for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}


def _env(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ProjectError(f"environment variable {name} is not set (run inside an sbatch allocation)")
    return value


def tasks_per_node(env: Mapping[str, str]) -> list[int]:
    """Tasks (ranks) on each node of the job, in node-list order: SLURM_TASKS_PER_NODE ("2(x3),1")."""
    hosts = expand_nodelist(_env(env, "SLURM_JOB_NODELIST"))
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not spec:
        raise ProjectError("SLURM_TASKS_PER_NODE is not set: submit with --ntasks-per-node (one task per rank)")
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ProjectError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if len(counts) == 1:  # SLURM_NTASKS_PER_NODE is one number for every node
        counts *= len(hosts)
    if len(counts) != len(hosts) or min(counts) < 1:
        raise ProjectError(f"SLURM_TASKS_PER_NODE={spec!r} does not match the {len(hosts)} node(s) of "
                           f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r}")
    return counts


def _gpus_on_node(env: Mapping[str, str]) -> int:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        match = re.search(r"(\d+)$", env.get(name, "").split("(")[0])  # "8", "gpu:8", "a100:8"
        if match:
            return int(match.group(1))
    return 0


def threads_per_rank(env: Mapping[str, str], tasks_on_node: int) -> int:
    """OMP/MKL threads per rank: the CPUs Slurm gave each task (--cpus-per-task), else the node's share."""
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    cpus = re.match(r"\d+", env.get("SLURM_CPUS_ON_NODE", ""))
    return max(1, (int(cpus.group(0)) if cpus else os.cpu_count() or 1) // max(1, tasks_on_node))


def check_world(cfg: RunConfig, world_size: int) -> None:
    """The layout and batch checks of launcher.pretrain.prepare, with the allocation's world size: a config
    that cannot run on these ranks fails here, in the job log, before any rank starts (and is not requeued)."""
    validate_layout(cfg.model, tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                    zero_stage=cfg.parallel.zero_stage, world_size=world_size,
                    micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size)


def launch_command(config: str, overrides: list[str], hostfile: Path, port: int | None = None,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """Write the hostfile for this allocation and return the srun-based deepspeed command."""
    env = os.environ if env is None else env
    hosts = expand_nodelist(_env(env, "SLURM_JOB_NODELIST"))
    tasks = tasks_per_node(env)
    gpus = _gpus_on_node(env)
    if gpus and gpus != tasks[0]:
        raise ProjectError(f"{gpus} GPUs but {tasks[0]} task(s) on the first node: one rank per GPU, submit with "
                           f"--ntasks-per-node={gpus} (or --gpus-per-node=0 on a CPU partition)")
    check_world(load_config(config, overrides), sum(tasks))
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"{host} slots={count}\n" for host, count in zip(hosts, tasks)))
    threads = threads_per_rank(env, tasks[0])
    port = slurm_master_port(env) if port is None else port
    # The ranks read MASTER_* (srun passes the environment on); deepspeed's own --master_addr only keeps it
    # from asking the first host over ssh. --no_ssh_check: srun, not ssh, reaches the nodes.
    # SRUN_CPUS_PER_TASK: since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
    variables = [f"OMP_NUM_THREADS={threads}", f"MASTER_ADDR={hosts[0]}", f"MASTER_PORT={port}",
                 *([f"SRUN_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else [])]
    cmd = ["env", *variables, "deepspeed", "--hostfile", str(hostfile), "--master_addr", hosts[0],
           "--master_port", str(port), "--no_ssh_check", "--force_multi", "--launcher", "slurm",
           "launcher/pretrain.py", "--config", config, "--resume", "auto"]
    for override in overrides:
        cmd += ["--set", override]
    return cmd


def slurm_attempt(env: Mapping[str, str] | None = None) -> str | None:
    """This run of the job, "<job id>.<restart count>" (a requeued job keeps its id), or None outside Slurm."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    return f"{job}.{env.get('SLURM_RESTART_COUNT') or 0}" if job else None


def requeue_decision(cfg: RunConfig, status: int, env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether this attempt ended in a stop that a requeue resumes, and why (one line for the job log).

    Only this attempt's outcome counts: its launch exit status and a summary.json this attempt wrote. A
    summary left by an earlier attempt's signal stop says nothing about a crash now."""
    attempt = slurm_attempt(env)
    path = cfg.run_path / "summary.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        summary = {}
    mine = bool(summary) and summary.get("attempt") == attempt
    if status in STOP_STATUSES and not mine:
        return True, (f"attempt {attempt} was stopped by {STOP_STATUSES[status]} (exit {status}) before the "
                      f"trainer could catch it; the next attempt resumes from the latest checkpoint, if any")
    if status:
        return False, (f"attempt {attempt} failed with exit status {status}: not requeued (a crash would fail "
                       f"the same way again; fix it and resubmit)")
    if not mine:
        return False, f"attempt {attempt} wrote no {path}: not requeued"
    if summary.get("completed"):
        return False, f"run {cfg.logging.run_name} completed at step {summary.get('steps')}: not requeued"
    if not summary.get("stopped_by"):
        return False, (f"run {cfg.logging.run_name} stopped at step {summary.get('steps')} without a signal: "
                       f"not requeued")
    return True, (f"run {cfg.logging.run_name} stopped by {summary['stopped_by']} at step {summary.get('steps')} "
                  f"and checkpointed; the next attempt resumes from it")


def requeue_if_unfinished(cfg: RunConfig, status: int, env: Mapping[str, str] | None = None) -> bool:
    """Requeue the job when `requeue_decision` says so; prints the reason either way. True if requeued."""
    env = os.environ if env is None else env
    requeue, reason = requeue_decision(cfg, status, env)
    print(f"[requeue] {'requeued' if requeue else 'done'}: {reason}", file=sys.stderr, flush=True)
    if requeue:
        job = _env(env, "SLURM_JOB_ID")
        try:
            subprocess.run(["scontrol", "requeue", job], check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise ProjectError(f"scontrol requeue {job} failed ({error}); resubmit the same command to continue "
                               f"from the checkpoint") from None
    return requeue


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.slurm", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("command", "requeue-if-unfinished"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--hostfile", default=None, help="default: runs/<run_name>/hostfile-<job id>")
    parser.add_argument("--port", type=int, default=None, help="default: derived from the job id")
    parser.add_argument("--status", type=int, default=0, help="requeue-if-unfinished: the launch's exit status")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # bad config: fail before anything is launched
    if args.action == "command":
        import torch

        from launcher.preflight import preflight

        # In the allocation, before the hostfile is written and any rank starts: what every rank would fail on.
        preflight(cfg, torch.device("cuda" if _gpus_on_node(os.environ) else "cpu"))
        hostfile = Path(args.hostfile or cfg.run_path / f"hostfile-{os.environ.get('SLURM_JOB_ID', 'local')}")
        print(shlex.join(launch_command(args.config, args.overrides, hostfile, args.port)))
    else:
        requeue_if_unfinished(cfg, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
