#!/usr/bin/env bash
# Pretrain opt_1b3 with configs/opt_1b3.yaml: `sbatch slurm/opt_1b3.sh [--set key=value ...]`.
# Multi-node: `sbatch --nodes=4 slurm/opt_1b3.sh`. Dry run (prints the launch command, starts nothing):
# `DRY_RUN=1 bash slurm/opt_1b3.sh` inside an allocation (or with SLURM_JOB_NODELIST etc. set).
#SBATCH --job-name=opt_1b3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%x-%j.out
# --signal: 5 minutes before the time limit every rank gets SIGUSR1, finishes its step, checkpoints
# and exits; the job then requeues itself and resumes from runs/<run_name>/checkpoints/latest.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:-configs/opt_1b3.yaml}
source slurm/common.sh
