# Shared body of the sbatch scripts (sourced after `cd` to the repository and CONFIG=...).
# Builds the hostfile and the srun-based deepspeed command (launcher/slurm.py), runs it, and requeues
# the job when the trainer stopped on the time-limit signal or a preemption before its last step.
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
"$PYTHON" -m launcher.slurm requeue-if-unfinished --config "$CONFIG" "$@" || true
exit "$status"
