"""Slurm glue for `slurm/*.sh`: node-list expansion, the DeepSpeed hostfile and launch command, requeue.

    python -m launcher.slurm command --config configs/opt_1b3.yaml [--set k=v ...]   # prints the command
    python -m launcher.slurm requeue-if-unfinished --config configs/opt_1b3.yaml     # after the run returns

Kept in Python (not bash) so the logic is unit-tested with a fake Slurm environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from launcher.config import load_config
from model.errors import ProjectError


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


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ProjectError(f"environment variable {name} is not set (run inside an sbatch allocation)")
    return value


def gpus_per_node() -> int:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        match = re.search(r"(\d+)$", value.split("(")[0])  # "8", "gpu:8", "8(x2)"
        if match:
            return int(match.group(1))
    raise ProjectError("cannot tell GPUs per node: set SLURM_GPUS_ON_NODE or --gpus-per-node")


def launch_command(config: str, overrides: list[str], hostfile: Path, port: int = 29500) -> list[str]:
    """Write the hostfile for this allocation and return the deepspeed command (srun-based multi-node)."""
    hosts = expand_nodelist(_env("SLURM_JOB_NODELIST"))
    slots = gpus_per_node()
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    # srun starts every rank as a job step (also on one node, hence --force_multi), so Slurm's
    # `--signal=USR1@T` and preemption SIGTERM reach each rank directly; no pdsh/ssh needed.
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", hosts[0], "--master_port", str(port),
           "--force_multi", "--launcher", "slurm", "launcher/pretrain.py", "--config", config, "--resume", "auto"]
    for override in overrides:
        cmd += ["--set", override]
    return cmd


def requeue_if_unfinished(config: str, overrides: list[str]) -> bool:
    """Requeue the job when the trainer stopped on a signal before the last step; True if requeued.

    A crash (no summary, or no `stopped_by`) is not requeued: it would fail the same way again."""
    cfg = load_config(config, overrides)
    path = cfg.run_path / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("completed", True) or not summary.get("stopped_by"):
        return False
    job = _env("SLURM_JOB_ID")
    subprocess.run(["scontrol", "requeue", job], check=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("command", "requeue-if-unfinished"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--hostfile", default=None, help="default: runs/<run_name>/hostfile-<job id>")
    parser.add_argument("--port", type=int, default=29500)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # bad config: fail before anything is launched
        if args.action == "command":
            hostfile = Path(args.hostfile or cfg.run_path / f"hostfile-{os.environ.get('SLURM_JOB_ID', 'local')}")
            print(shlex.join(launch_command(args.config, args.overrides, hostfile, args.port)))
        elif requeue_if_unfinished(args.config, args.overrides):
            print(f"run {cfg.logging.run_name} is not finished: job requeued", file=sys.stderr)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
