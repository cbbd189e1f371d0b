"""Submit pretraining through submitit's Python API (Slurm), or run it locally with `--local`.

    python -m launcher.submit --config configs/opt_1b3.yaml --nodes 2 --gpus-per-node 8 --partition gpu
    python -m launcher.submit --config configs/opt_tiny.yaml --gpus-per-node 0 --tasks-per-node 2   # CPU nodes
    python -m launcher.submit --config configs/opt_tiny.yaml --local --tasks 2     # CPU processes, gloo

One submitit task per rank (per GPU on GPU nodes); the job is Checkpointable: on timeout or preemption
(submitit's SIGUSR2) the trainer checkpoints its current step (launcher/signals.py), then submitit's
handler requeues the same job, which continues with `--resume auto`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import submitit
import torch

from launcher.config import load_config
from launcher.distributed import slurm_master_port
from launcher.signals import GracefulStop
from launcher.slurm import check_world, threads_per_rank
from common.cli import ArgumentParser, CommandFailed, positive_int, run_command
from common.errors import ConfigError
from launcher.preflight import preflight


class TrainJob(submitit.helpers.Checkpointable):
    """A picklable job: sets the torch.distributed environment from submitit's, then runs the trainer."""

    def __init__(self, config: str, overrides: list[str], port: int | None) -> None:
        self.config, self.overrides, self.port = config, overrides, port

    def __call__(self) -> int:
        # Ours from before the trainer's imports; when the trainer has checkpointed and returned, a signal it
        # swallowed goes on to submitit's handler, which requeues the job (USR2) or ignores it (TERM).
        with GracefulStop.installed():
            env = submitit.JobEnvironment()
            port = self.port or (slurm_master_port(os.environ) if os.environ.get("SLURM_JOB_ID") else 29512)
            os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                              LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(port))
            # Before torch loads (the trainer's import below): one OpenMP pool per rank sized to its CPUs, as
            # the sbatch scripts do; torch's default (every core of the node in every rank) oversubscribes.
            threads = threads_per_rank(os.environ, max(1, env.num_tasks // env.num_nodes))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            if "torch" in sys.modules:  # unpickling this job loaded the config schema, and with it torch, whose
                sys.modules["torch"].set_num_threads(threads)  # pool the variable no longer sizes
            from launcher.pretrain import main

            args = ["--config", self.config, "--resume", "auto"] + [x for o in self.overrides for x in ("--set", o)]
            code = main(args)
            if code:  # inside: a failed run does not pass a swallowed signal on (no requeue of a crash)
                raise SystemExit(code)
        return code


def build_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if args.local else None)
    tasks = args.tasks if args.local else (args.tasks_per_node or args.gpus_per_node or 1)
    executor.update_parameters(name=args.name, nodes=1 if args.local else args.nodes, tasks_per_node=tasks,
                               timeout_min=args.timeout_min, cpus_per_task=args.cpus_per_task)
    if not args.local:
        executor.update_parameters(slurm_signal_delay_s=args.signal_delay_s,
                                   **({"gpus_per_node": args.gpus_per_node} if args.gpus_per_node else {}),
                                   **({"slurm_partition": args.partition} if args.partition else {}))
    return executor


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.submit", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local", action="store_true", help="run on this machine (CPU processes unless GPUs)")
    parser.add_argument("--tasks", type=int, default=1, help="--local: number of processes (ranks)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 on a CPU partition")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="ranks per node (default: --gpus-per-node, or 1 with no GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=int, default=48 * 60)
    parser.add_argument("--signal-delay-s", type=int, default=300, help="time-limit warning before the end")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (default: derived from the job id)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    args = parser.parse_args(argv)
    check_flags(args)
    cfg = load_config(args.config, args.overrides)  # bad config: fail before submitting anything
    world = args.tasks if args.local else args.nodes * (args.tasks_per_node or args.gpus_per_node or 1)
    check_world(cfg, world)
    # What the job would fail on, checked before it is queued: on the device its nodes will have (this
    # machine's for --local; a GPU node when --gpus-per-node > 0), the folders it writes, the periodic tasks.
    job_device = None if args.local else torch.device("cuda" if args.gpus_per_node else "cpu")
    preflight(cfg, job_device)
    args.name = args.name or cfg.logging.run_name
    executor = build_executor(args, cfg.run_path / "submitit")
    # The job runs in this directory too, but an absolute config path survives a --chdir or a moved shell.
    job = executor.submit(TrainJob(str(Path(args.config).resolve()), args.overrides, args.port))
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}); logs: {cfg.run_path / 'submitit'}")
    if args.wait or args.local:
        try:
            job.results()  # one result per task (rank); raises if any rank failed
        except submitit.core.utils.UncompletedJobError as failed:  # FailedJobError too: the job's own line
            raise CommandFailed(f"job {job.job_id} failed: {job_error_line(job, failed)} "
                            f"(logs: {cfg.run_path / 'submitit'})") from None
        print(f"job {job.job_id} finished; summary: {cfg.run_path / 'summary.json'}")
    return 0


def job_error_line(job: submitit.Job, failed: Exception) -> str:
    """The job's last `error:` line (the trainer's one-line error), else the last line submitit reported."""
    try:
        text = job.stderr() or ""
    except Exception:  # no log file (the job never started)
        text = ""
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    if lines:
        return lines[-1].removeprefix("error: ")
    tail = [line for line in str(failed).splitlines() if line.strip()]
    return tail[-1].strip() if tail else type(failed).__name__


def check_flags(args: argparse.Namespace) -> None:
    for flag in ("tasks", "nodes", "cpus_per_task", "timeout_min"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag), allow_none=False)
    positive_int("--tasks-per-node", args.tasks_per_node)
    if args.gpus_per_node < 0:
        raise ConfigError("--gpus-per-node", args.gpus_per_node, "must be >= 0 (0 on a CPU partition)")
    if args.signal_delay_s < 0:
        raise ConfigError("--signal-delay-s", args.signal_delay_s, "must be >= 0")
    if args.port is not None and not 1024 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "must be a port number in 1024..65535")


if __name__ == "__main__":
    sys.exit(main())
