#!/usr/bin/env bash
# Tokenize a corpus once into megatron-core indexed shards, as a Slurm array: each task prepares every
# (task)-th document shard with --cpus-per-task worker processes, then one dependent job merges them.
#   JOB=$(sbatch --parsable slurm/prepare.sh)                                   # configs/prepare/opt_125m.yaml
#   sbatch --dependency=afterok:$JOB --array=0 --export=ALL,MERGE=1 slurm/prepare.sh   # merge + manifest
#   PREPARE_CONFIG=configs/prepare/wiki40b_en_50k.yaml OUT=data/prepared/wiki40b_en_50k sbatch slurm/prepare.sh
# A killed or requeued task redoes only its unfinished shards; rerunning the whole array is safe (done shards
# are kept). Every task must see the same OUT folder (a shared file system). The tokenizer is trained once
# (a file lock under data.cache_dir) by whichever task gets there first; the others wait for it.
#SBATCH --job-name=prepare
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

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
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PREPARE_CONFIG=${PREPARE_CONFIG:-configs/prepare/opt_125m.yaml}
OUT=${OUT:-data/prepared/opt_125m}
SHARDS=${SHARDS:-256}   # document shards per split: fixed for a folder; a multiple of the array size
if [[ "${MERGE:-0}" == "1" ]]; then
  exec "$PYTHON" -m data_pipeline.prepare --config "$PREPARE_CONFIG" --out "$OUT" --num-shards "$SHARDS" --merge "$@"
fi
exec "$PYTHON" -m data_pipeline.prepare --config "$PREPARE_CONFIG" --out "$OUT" --num-shards "$SHARDS" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" --task "${SLURM_ARRAY_TASK_ID:-0}" --tasks "${SLURM_ARRAY_TASK_COUNT:-1}" "$@"
