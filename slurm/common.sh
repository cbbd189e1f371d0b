# Shared body of the sbatch scripts, sourced from the repository root with CONFIG=... set.
# `launcher.slurm command` checks the config against this allocation (world size = tasks), writes the
# hostfile and prints the srun-based deepspeed command; after it returns, `requeue-if-unfinished` requeues
# the job only if this attempt stopped on a signal (time limit, preemption) and checkpointed.
PYTHON=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PYTHON"):$PATH"  # the venv's deepspeed launcher

# Overrides after the script name: `sbatch slurm/opt_1b3.sh --set train.lr=1e-4`.
LAUNCH=$("$PYTHON" -m launcher.slurm command --config "$CONFIG" "$@")
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} attempt ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
  "in $(pwd): $LAUNCH"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exit 0
fi

status=0
eval "$LAUNCH" || status=$?
"$PYTHON" -m launcher.slurm requeue-if-unfinished --status "$status" --config "$CONFIG" "$@" || true
exit "$status"
