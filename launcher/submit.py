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

from launcher.config import load_config
from launcher.distributed import slurm_master_port
from launcher.signals import GracefulStop
from launcher.slurm import check_world, threads_per_rank
from common.errors import ProjectError


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    try:
        cfg = load_config(args.config, args.overrides)  # bad config: fail before submitting anything
        world = args.tasks if args.local else args.nodes * (args.tasks_per_node or args.gpus_per_node or 1)
        check_world(cfg, world)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.name = args.name or cfg.logging.run_name
    executor = build_executor(args, cfg.run_path / "submitit")
    # The job runs in this directory too, but an absolute config path survives a --chdir or a moved shell.
    job = executor.submit(TrainJob(str(Path(args.config).resolve()), args.overrides, args.port))
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}); logs: {cfg.run_path / 'submitit'}")
    if args.wait or args.local:
        job.results()  # one result per task (rank); raises if any rank failed
        print(f"job {job.job_id} finished; summary: {cfg.run_path / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
