#!/usr/bin/env bash
# One machine, NUM_GPUS ranks (GPUs, or CPU ranks on a machine without GPUs), started by the
# DeepSpeed launcher. Extra arguments go to the trainer (python -m vlm_dist.train --help):
#
#     launch/single_node.sh --max-steps 1000 --ds-set train_micro_batch_size_per_gpu=32
#
# DeepSpeed 0.19.8's launcher takes `--module`, not `-m`: `deepspeed --num_gpus 2 -m ...` stops
# with "unrecognized arguments: -m". On a CPU-only machine --num_gpus N starts N CPU ranks
# (without it the CPU accelerator counts NUMA nodes: usually 1 rank).
set -euo pipefail

# ---- what a user edits (each may also be set in the environment) -------------------------------
CONFIG=${CONFIG:-demo}                                 # preset (tiny, demo, base) or a YAML/JSON run config
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}          # batch sizes, optimizer, schedule, bf16, ZeRO stage
TRAIN_SHARDS=${TRAIN_SHARDS:-data/demo/shards/train}   # shard-coco output dir or a brace pattern of tars
VAL_SHARDS=${VAL_SHARDS-data/demo/shards/val}          # empty: no validation
RUN_DIR=${RUN_DIR:-runs/single_node}                   # checkpoints/, tb/, metrics.jsonl
NUM_GPUS=${NUM_GPUS-8}      # ranks on this machine. Empty: let deepspeed read CUDA_VISIBLE_DEVICES
                            # (with --num_gpus it ignores CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1)
MASTER_PORT=${MASTER_PORT:-29500}                      # change it to run two jobs on one machine
DEEPSPEED=${DEEPSPEED:-deepspeed}                      # e.g. .venv/bin/deepspeed
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}           # torchrun's default; the deepspeed launcher sets none
# HF_HUB_OFFLINE is left as it is: with `base`, local rank 0 downloads the OpenAI weights once into the
# HF cache (HF_HOME). Without a network set HF_HUB_OFFLINE=1 and fill the cache beforehand, or pass
# --set model.vision.pretrained=/path/to/open_clip_checkpoint.
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."   # relative paths above are relative to the repository root
# `--resume auto` continues from the newest complete checkpoint in RUN_DIR if there is one.
TRAIN_ARGS=(--config "$CONFIG" --ds "$DS_CONFIG" --train-shards "$TRAIN_SHARDS" --run-dir "$RUN_DIR" --resume auto)
if [[ -n "$VAL_SHARDS" ]]; then TRAIN_ARGS+=(--val-shards "$VAL_SHARDS"); fi
LAUNCH=(--master_port "$MASTER_PORT")
if [[ -n "$NUM_GPUS" ]]; then LAUNCH+=(--num_gpus "$NUM_GPUS"); fi

exec "$DEEPSPEED" "${LAUNCH[@]}" --module vlm_dist.train "${TRAIN_ARGS[@]}" "$@"
