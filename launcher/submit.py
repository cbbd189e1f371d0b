"""Submit pretraining through submitit's Python API (Slurm), or run it locally with `--local`.

    python -m launcher.submit --config configs/opt_1b3.yaml --nodes 2 --gpus-per-node 8 --partition gpu
    python -m launcher.submit --config configs/opt_tiny.yaml --local --tasks 2     # CPU processes, gloo

One submitit task per GPU (rank); the job is Checkpointable: on timeout or preemption the trainer
checkpoints its current step (launcher/signals.py) and submitit requeues the same job, which
continues with `--resume auto`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import submitit

from launcher.config import load_config
from model.errors import ProjectError


class TrainJob(submitit.helpers.Checkpointable):
    """A picklable job: sets the torch.distributed environment from submitit's, then runs the trainer."""

    def __init__(self, config: str, overrides: list[str], port: int) -> None:
        self.config, self.overrides, self.port = config, overrides, port

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(self.port))
        from launcher.pretrain import main

        args = ["--config", self.config, "--resume", "auto"] + [x for o in self.overrides for x in ("--set", o)]
        code = main(args)
        if code:
            raise SystemExit(code)
        return code


def build_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if args.local else None)
    tasks = args.tasks if args.local else args.gpus_per_node
    executor.update_parameters(name=args.name, nodes=1 if args.local else args.nodes, tasks_per_node=tasks,
                               timeout_min=args.timeout_min, cpus_per_task=args.cpus_per_task)
    if not args.local:
        executor.update_parameters(gpus_per_node=args.gpus_per_node, slurm_signal_delay_s=args.signal_delay_s,
                                   **({"slurm_partition": args.partition} if args.partition else {}))
    return executor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local", action="store_true", help="run on this machine (CPU processes unless GPUs)")
    parser.add_argument("--tasks", type=int, default=1, help="--local: number of processes (ranks)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=int, default=48 * 60)
    parser.add_argument("--signal-delay-s", type=int, default=300, help="time-limit warning before the end")
    parser.add_argument("--port", type=int, default=29512)
    parser.add_argument("--name", default=None)
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # bad config: fail before submitting anything
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.name = args.name or cfg.logging.run_name
    executor = build_executor(args, cfg.run_path / "submitit")
    job = executor.submit(TrainJob(args.config, args.overrides, args.port))
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}); logs: {cfg.run_path / 'submitit'}")
    if args.wait or args.local:
        job.results()  # one result per task (rank); raises if any rank failed
        print(f"job {job.job_id} finished; summary: {cfg.run_path / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
