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
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PATH="$(dirname "$PYTHON"):$PATH"  # the venv's deepspeed launcher

# Overrides after the script name: `sbatch slurm/opt_1b3.sh --set train.lr=1e-4`.
LAUNCH=$("$PYTHON" -m launcher.slurm command --config "$CONFIG" "$@")
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: $LAUNCH"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exit 0
fi

status=0
eval "$LAUNCH" || status=$?
# Stopped by the time-limit signal or preemption before the last step: requeue (resumes automatically).
"$PYTHON" -m launcher.slurm requeue-if-unfinished --config "$CONFIG" "$@" || true
exit "$status"
