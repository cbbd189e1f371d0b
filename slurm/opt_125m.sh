#!/usr/bin/env bash
# Pretrain opt_125m with configs/opt_125m.yaml: `sbatch slurm/opt_125m.sh [--set key=value ...]`.
# Multi-node: `sbatch --nodes=4 slurm/opt_125m.sh`. Dry run (prints the launch command, starts nothing):
# `DRY_RUN=1 bash slurm/opt_125m.sh` inside an allocation (or with SLURM_JOB_NODELIST etc. set).
#SBATCH --job-name=opt_125m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%x-%j.out
# --signal: 5 minutes before the time limit every rank gets SIGUSR1, finishes its step, checkpoints
# and exits; the job then requeues itself and resumes from runs/<run_name>/checkpoints/latest.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:-configs/opt_125m.yaml}
source slurm/common.sh
