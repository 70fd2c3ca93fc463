#!/usr/bin/env bash
# Multi-node without ssh or pdsh: run this script on EVERY node (by hand, a container scheduler,
# or an srun step as in slurm.sbatch), each with its own NODE_RANK; the others are identical:
#
#     node-0$ NODE_RANK=0 MASTER_ADDR=node-0 launch/no_ssh_node.sh --max-steps 20000
#     node-1$ NODE_RANK=1 MASTER_ADDR=node-0 launch/no_ssh_node.sh --max-steps 20000
#
# Each node's launcher (`deepspeed --no_ssh --node_rank R`) starts only its own ranks. The hostfile
# gives every node's rank count (its slots; node R is its R-th line), from which global ranks and
# the world size follow; host names are not contacted in this mode. MASTER_ADDR is required: without
# it deepspeed would try `ssh HOST hostname -I`. Node 0 must be the MASTER_ADDR machine (it runs
# global rank 0, which listens on MASTER_PORT). The launchers wait for each other at start-up.
# Shards must be readable from every node (shared filesystem or a copy at the same path), and
# RUN_DIR must be shared so that checkpoints from all ranks land in one place for --resume auto.
set -euo pipefail

# ---- what a user edits (each may also be set in the environment) -------------------------------
CONFIG=${CONFIG:-base}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
TRAIN_SHARDS=${TRAIN_SHARDS:-/shared/coco/shards/train}
VAL_SHARDS=${VAL_SHARDS-/shared/coco/shards/val}       # empty: no validation
RUN_DIR=${RUN_DIR:-/shared/runs/no_ssh}
HOSTFILE=${HOSTFILE:-launch/hostfile}                  # same file on every node, see hostfile.example
NODE_RANK=${NODE_RANK:-0}                              # 0 .. NNODES-1, different on every node
NNODES=${NNODES:-}          # empty: every host in HOSTFILE; N: its first N lines
NUM_GPUS=${NUM_GPUS:-}      # empty: each host's slots; N: GPUs 0..N-1 on every node
MASTER_ADDR=${MASTER_ADDR:-node-0}                     # node 0's address, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}                      # the same on every node
DEEPSPEED=${DEEPSPEED:-deepspeed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# HF_HUB_OFFLINE is left as it is: local rank 0 of each node downloads pretrained weights into its HF
# cache (HF_HOME) once; offline nodes need a filled cache or model.vision.pretrained=/path/to/file.
# Across nodes, pick the interface that connects them: NCCL_SOCKET_IFNAME (GPUs) or
# GLOO_SOCKET_IFNAME (CPU/gloo); see multi_node_pdsh.sh for other NCCL settings.
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."   # relative paths above are relative to the repository root
if [[ ! -f "$HOSTFILE" ]]; then  # without one deepspeed falls back to a single local node
  echo "error: hostfile $HOSTFILE not found (copy launch/hostfile.example and list your nodes)" >&2
  exit 2
fi
TRAIN_ARGS=(--config "$CONFIG" --ds "$DS_CONFIG" --train-shards "$TRAIN_SHARDS" --run-dir "$RUN_DIR" --resume auto)
if [[ -n "$VAL_SHARDS" ]]; then TRAIN_ARGS+=(--val-shards "$VAL_SHARDS"); fi
LAUNCH=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "$NNODES" ]]; then LAUNCH+=(--num_nodes "$NNODES"); fi
if [[ -n "$NUM_GPUS" ]]; then LAUNCH+=(--num_gpus "$NUM_GPUS"); fi

exec "$DEEPSPEED" "${LAUNCH[@]}" --module vlm_dist.train "${TRAIN_ARGS[@]}" "$@"
