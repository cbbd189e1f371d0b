#!/usr/bin/env bash
# The tiny CPU demo model on a CPU-only partition (no GPUs requested): `sbatch slurm/opt_tiny_cpu.sh
# [--set key=value ...]` from any directory; two ranks (gloo) as data parallelism. Any other layout by
# option, e.g. `sbatch --nodes=2 --ntasks-per-node=1 slurm/opt_tiny_cpu.sh --set parallel.tensor=2`.
#SBATCH --job-name=opt_tiny_cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --output: in the directory sbatch was run from (it exists; a requeued job appends to the same file).
# --signal: 2 minutes before the time limit every rank gets SIGUSR1, finishes its step, checkpoints
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
CONFIG=${CONFIG:-configs/opt_tiny.yaml}
source slurm/common.sh
