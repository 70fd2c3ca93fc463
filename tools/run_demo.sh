#!/usr/bin/env bash
# The whole demo, end to end, on whatever this machine has (CPU ranks with gloo, or its GPUs):
#   synthetic data -> shard-coco -> ZeRO-2 training of the `demo` preset -> export -> evaluation.
# `make demo` runs this inside the project's venv. Variables below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/demo}                 # demo images, annotations and shards
RUN=${RUN:-runs/demo}                   # checkpoints/, tb/, metrics.jsonl, export/, eval.json
DS_CONFIG=${DS_CONFIG:-ds_configs/demo_zero2.json}
N_TRAIN=${N_TRAIN:-2000}
N_VAL=${N_VAL:-200}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}                     # two CPU ranks; DeepSpeed falls back to its CPU accelerator + gloo
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

start=$(date +%s)
if [ ! -f "$DATA/shards/val/manifest.json" ]; then
  vlm-dist demo-data --out "$DATA" --train "$N_TRAIN" --val "$N_VAL" --shard
fi

deepspeed --num_gpus "$NPROC" --module vlm_dist.train --config demo --ds "$DS_CONFIG" \
  --train-shards "$DATA/shards/train" --val-shards "$DATA/shards/val" --run-dir "$RUN" --resume auto "$@"

vlm-dist export --ckpt "$RUN/checkpoints" --tag best --out "$RUN/export"
vlm-dist eval --model "$RUN/export" --shards "$DATA/shards/val" --out "$RUN/eval.json"
echo "demo finished in $(( $(date +%s) - start )) s; TensorBoard: tensorboard --logdir $RUN/tb"
