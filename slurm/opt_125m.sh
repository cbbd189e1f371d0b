#!/usr/bin/env bash
# Pretrain opt_125m with configs/opt_125m.yaml: `sbatch slurm/opt_125m.sh [--set key=value ...]` from any directory.
# Multi-node: `sbatch --nodes=4 slurm/opt_125m.sh`. On a CPU partition: `sbatch --gpus-per-node=0
# --ntasks-per-node=R --cpus-per-task=C slurm/opt_125m.sh` (R ranks per node). Dry run (prints the launch
# command, starts nothing): `DRY_RUN=1 bash slurm/opt_125m.sh` inside an allocation.
#SBATCH --job-name=opt_125m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --output: in the directory sbatch was run from (it exists; a requeued job appends to the same file).
# --signal: 5 minutes before the time limit every rank gets SIGUSR1, finishes its step, checkpoints
# and exits; the job then requeues itself and resumes from runs/<run_name>/checkpoints/latest.
set -euo pipefail

# sbatch runs a copy of this file from slurmd's spool directory, so $0 cannot locate the repository:
# take OUTEFFHOP_REPO, else the submitted script's path that Slurm records (scontrol's Command=, relative
# to the submit directory, which is the working directory), else $0 (run with plain bash).
for REPO in "${OUTEFFHOP_REPO:-}" \
    "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null \
                       | sed -n 's|^ *Command=\([^ ]*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p')}" \
    "$(dirname "$0")/.."; do
  [[ -n "$REPO" && -f "$REPO/slurm/common.sh" ]] && break
done
if [[ ! -f "$REPO/slurm/common.sh" ]]; then
  echo "error: cannot find the repository from $0 (set OUTEFFHOP_REPO=/path/to/repo)" >&2
  exit 2
fi
cd "$REPO"
CONFIG=${CONFIG:-configs/opt_125m.yaml}
source slurm/common.sh
