#!/usr/bin/env bash
# The whole demo, end to end, on whatever this machine has (CPU ranks with gloo, or its GPUs):
#   synthetic data -> shard-coco -> ZeRO-2 training of the `demo` preset -> export -> evaluation -> learning curve.
# `make demo` runs this inside the project's venv. Variables below can be overridden from the environment;
# extra arguments go to the trainer (e.g. --ds-set bf16.enabled=false). Wall time per phase: $RUN/timings.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/demo}                 # demo images, annotations and shards
RUN=${RUN:-runs/demo}                   # checkpoints/, tb/, metrics.jsonl, export/, eval.json, learning_curve.png
DS_CONFIG=${DS_CONFIG:-ds_configs/demo_zero2.json}  # bf16 "auto": bf16 where the hardware has it natively, else fp32
N_TRAIN=${N_TRAIN:-4800}               # the demo preset trains 16 epochs: 16 x N_TRAIN / 32 steps (global batch 32)
N_VAL=${N_VAL:-200}
MASTER_PORT=${MASTER_PORT:-29500}       # set another where several runs share a machine
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}                     # two CPU ranks; DeepSpeed falls back to its CPU accelerator + gloo
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

mkdir -p "$RUN"
: >> "$RUN/timings.txt"
phase() {  # phase NAME COMMAND...: run it and record its wall time
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$RUN/timings.txt"
}

start=$(date +%s)
if [ ! -f "$DATA/shards/val/manifest.json" ]; then
  phase data vlm-dist demo-data --out "$DATA" --train "$N_TRAIN" --val "$N_VAL" --shard
fi

phase train deepspeed --master_port "$MASTER_PORT" --num_gpus "$NPROC" --module vlm_dist.train --config demo --ds "$DS_CONFIG" \
  --train-shards "$DATA/shards/train" --val-shards "$DATA/shards/val" --run-dir "$RUN" --resume auto "$@"

phase export vlm-dist export --ckpt "$RUN/checkpoints" --tag best --out "$RUN/export"
phase eval vlm-dist eval --model "$RUN/export" --shards "$DATA/shards/val" --out "$RUN/eval.json"
if python -c "import matplotlib" 2>/dev/null; then
  phase plot python tools/plot_curve.py "$RUN/metrics.jsonl" --out "$RUN/learning_curve.png" --title "make demo: $RUN"
else
  echo "learning curve: pip install -e \".[plot]\" then python tools/plot_curve.py $RUN/metrics.jsonl --out $RUN/learning_curve.png"
fi
echo "demo finished in $(( $(date +%s) - start )) s ($(tr '\n' ';' < "$RUN/timings.txt")); TensorBoard: tensorboard --logdir $RUN/tb"
