#!/usr/bin/env bash
# COCO from nothing to Karpathy-test scores on one machine with NUM_GPUS GPUs:
#   shard-coco (Karpathy train [+ VQA v2 train] / val / test; images downscaled to the tower's input)
#   [-> precompute-features (FEATURES=1): the frozen tower's tokens for train / val, computed once]
#   -> vlm-dist train --num-gpus N --config base -> export (best val loss) -> vlm-dist eval on Karpathy test.
#
#     COCO=/data/coco NUM_GPUS=4 launch/coco_base.sh                     # extra arguments go to the trainer:
#     COCO=/data/coco NUM_GPUS=4 launch/coco_base.sh --max-steps 20000 --eval-every 1000
#
# The COCO folder, as the official zips and LAVIS's Karpathy files unpack:
#   $COCO/train2014/ $COCO/val2014/                                     the images
#   $COCO/annotations/coco_karpathy_{train,val,test}.json               Karpathy splits (LAVIS format)
#   $COCO/vqa/v2_OpenEnded_mscoco_train2014_questions.json              optional: VQA v2 train questions
#   $COCO/vqa/v2_mscoco_train2014_annotations.json                      and answers (train2014 images only,
#                                                                       so none of Karpathy val/test leaks in)
# The `base` preset loads OpenAI's ViT-B-32 weights from the Hugging Face hub: local rank 0 downloads
# them once into the HF cache (HF_HOME); offline, pass --set model.vision.pretrained=/path/to/open_clip_checkpoint.
# Rerunning continues: finished shards are kept (shard-coco, and precompute-features for FEATURES=1 when
# made from the same shards by the same tower), training resumes from its newest checkpoint (--resume auto),
# the export and the evaluation are redone.
set -euo pipefail

# ---- what a user edits (each may also be set in the environment) -------------------------------
COCO=${COCO:?set COCO=/path/to/coco (train2014/, val2014/, annotations/coco_karpathy_*.json)}
KARPATHY=${KARPATHY:-$COCO/annotations}                # coco_karpathy_{train,val,test}.json
VQA=${VQA:-$COCO/vqa}                                  # VQA v2 train2014 files; missing: captions only
CONFIG=${CONFIG:-base}                                 # preset or YAML/JSON run config
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}          # batch sizes, optimizer, schedule, bf16, ZeRO stage
NUM_GPUS=${NUM_GPUS:-4}                                # ranks on this machine (CPU ranks without GPUs)
SHARDS=${SHARDS:-$COCO/shards}                         # shards/{train,val,test}
RUN_DIR=${RUN_DIR:-runs/coco_base}                     # checkpoints/, tb/, export/, eval_karpathy_test.json
RESIZE=${RESIZE:-}                                     # empty: the tower's image size (224 for ViT-B-32)
WORKERS=${WORKERS:-8}                                  # shard-coco processes
FEATURES=${FEATURES:-0}                                # 1: train on the frozen tower's precomputed features
                                                       # (no JPEG decoding or tower forward per epoch; the
                                                       # trainer's --set model.* options apply to it too)
MASTER_PORT=${MASTER_PORT:-29500}
VLM_DIST=${VLM_DIST:-vlm-dist}                         # e.g. ".venv/bin/vlm-dist" or "python -m vlm_dist.cli"
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."   # relative paths above are relative to the repository root
read -r -a VD <<< "$VLM_DIST"
for split in train val test; do
  if [[ ! -f "$KARPATHY/coco_karpathy_$split.json" ]]; then
    echo "error: $KARPATHY/coco_karpathy_$split.json not found (LAVIS's Karpathy split files; set KARPATHY=DIR)" >&2
    exit 2
  fi
done
if [[ -z "$RESIZE" ]]; then RESIZE=$("${VD[@]}" config geometry "$CONFIG" --get image_size); fi

# 1. Shards: one folder per split. Images whose shorter side exceeds RESIZE are downscaled to it: the
#    tower resizes to that and center-crops anyway, so nothing it sees is lost and the shards stay small.
VQA_ARGS=()
if [[ -f "$VQA/v2_OpenEnded_mscoco_train2014_questions.json" && -f "$VQA/v2_mscoco_train2014_annotations.json" ]]; then
  VQA_ARGS=(--vqa-questions "$VQA/v2_OpenEnded_mscoco_train2014_questions.json"
            --vqa-annotations "$VQA/v2_mscoco_train2014_annotations.json")
else
  echo "no VQA v2 train2014 files in $VQA: training on captions only" >&2
fi
"${VD[@]}" shard-coco --images "$COCO" --ann "$KARPATHY/coco_karpathy_train.json" "${VQA_ARGS[@]}" \
  --out "$SHARDS/train" --split train --resize "$RESIZE" --workers "$WORKERS"
for split in val test; do
  "${VD[@]}" shard-coco --images "$COCO" --ann "$KARPATHY/coco_karpathy_$split.json" \
    --out "$SHARDS/$split" --split "$split" --resize "$RESIZE" --workers "$WORKERS"
done

# 1b. FEATURES=1: the frozen tower once over train and val (on a GPU when there is one), with the model
#     overrides (--set model.*) given to the trainer below, so that its tower is the trainer's.
TRAIN=$SHARDS/train VAL=$SHARDS/val
if [[ "$FEATURES" == 1 ]]; then
  SETS=() ARGS=("$@")
  for ((i = 0; i + 1 < ${#ARGS[@]}; i++)); do
    if [[ "${ARGS[i]}" == --set && "${ARGS[i+1]}" == model.* ]]; then SETS+=(--set "${ARGS[i+1]}"); fi
  done
  for split in train val; do
    "${VD[@]}" precompute-features --shards "$SHARDS/$split" --out "$SHARDS/features_$split" --config "$CONFIG" \
      "${SETS[@]}" --workers "$WORKERS"
  done
  TRAIN=$SHARDS/features_train VAL=$SHARDS/features_val
fi

# 2. Training on NUM_GPUS ranks (the DeepSpeed launcher; one rank: in this process).
"${VD[@]}" train --num-gpus "$NUM_GPUS" --master-port "$MASTER_PORT" --config "$CONFIG" --ds "$DS_CONFIG" \
  --train-shards "$TRAIN" --val-shards "$VAL" --run-dir "$RUN_DIR" --resume auto "$@"

# 3. Export the checkpoint with the best validation loss, 4. score it on the Karpathy test split.
"${VD[@]}" export --ckpt "$RUN_DIR/checkpoints" --tag best --out "$RUN_DIR/export"
"${VD[@]}" eval --model "$RUN_DIR/export" --shards "$SHARDS/test" --out "$RUN_DIR/eval_karpathy_test.json"
