#!/usr/bin/env bash
# Several machines from one shell: the DeepSpeed launcher reads HOSTFILE and starts itself on every
# host over pdsh (passwordless ssh from this machine to each host, and pdsh installed here).
# Run it on the first host of the hostfile. Extra arguments go to the trainer:
#
#     HOSTFILE=launch/hostfile launch/multi_node_pdsh.sh --max-steps 20000
#
# Every node must see the same paths: this repository and its virtual environment (pdsh runs
# `cd $PWD; <this python> -m deepspeed.launcher.launch ...` there), TRAIN_SHARDS/VAL_SHARDS (a shared
# filesystem, or an identical copy on each node), and RUN_DIR (a shared filesystem: ZeRO writes one
# checkpoint file per rank, and --resume auto must find them all).
set -euo pipefail

# ---- what a user edits (each may also be set in the environment) -------------------------------
CONFIG=${CONFIG:-base}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
TRAIN_SHARDS=${TRAIN_SHARDS:-/shared/coco/shards/train}
VAL_SHARDS=${VAL_SHARDS-/shared/coco/shards/val}        # empty: no validation
RUN_DIR=${RUN_DIR:-/shared/runs/multi_node}
HOSTFILE=${HOSTFILE:-launch/hostfile}                   # "HOST slots=N" lines, see hostfile.example
NUM_NODES=${NUM_NODES:-}    # empty: every host in HOSTFILE; N: the first N
NUM_GPUS=${NUM_GPUS:-}      # empty: each host's slots; N: GPUs 0..N-1 on every host
# Node 0's address, reachable from every node; empty: the first host in HOSTFILE. (Without
# --master_addr deepspeed would run `ssh HOST hostname -I` and take its first address, which may
# belong to a docker/virtual interface.)
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}
# Only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* variables reach the remote ranks on their own; the
# others listed here are sent through a DeepSpeed env file (DS_ENV_FILE, one KEY=VALUE a line).
FORWARD_ENV=(OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
             TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}")  # JIT-built ops cache
# Hugging Face hub settings are forwarded only when set here: by default local rank 0 of each node
# downloads pretrained weights once into that node's cache; HF_HUB_OFFLINE=1 for nodes without internet.
for var in HF_HUB_OFFLINE HF_HOME HF_HUB_CACHE; do
  if [[ -n "${!var:-}" ]]; then FORWARD_ENV+=("$var=${!var}"); fi
done
# NCCL settings clusters commonly need (exported here, they are forwarded to every node):
#   export NCCL_SOCKET_IFNAME=eth0      # the interface that connects the nodes (also GLOO_SOCKET_IFNAME
#                                       #   for the CPU/gloo backend: add it to FORWARD_ENV)
#   export NCCL_IB_HCA=mlx5             # which InfiniBand adapters; NCCL_IB_DISABLE=1 for TCP only
#   export NCCL_DEBUG=WARN              # INFO prints the chosen transport/rings when debugging a hang
#   export NCCL_NET_GDR_LEVEL=PHB       # GPUDirect RDMA policy, site-specific
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # fail fast on a dead peer: not NCCL*, so add it to FORWARD_ENV
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."   # relative paths above are relative to the repository root
if [[ ! -f "$HOSTFILE" ]]; then
  echo "error: hostfile $HOSTFILE not found (copy launch/hostfile.example and list your nodes)" >&2
  exit 2
fi
if [[ -z "$MASTER_ADDR" ]]; then MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE"); fi
mkdir -p "$RUN_DIR"
# deepspeed looks for DS_ENV_FILE in ~ and in ./ ; an absolute path is read as it is.
DS_ENV_FILE="$(cd "$RUN_DIR" && pwd)/launch.env"; export DS_ENV_FILE
printf '%s\n' "${FORWARD_ENV[@]}" > "$DS_ENV_FILE"   # no blank lines: deepspeed splits each on "="

TRAIN_ARGS=(--config "$CONFIG" --ds "$DS_CONFIG" --train-shards "$TRAIN_SHARDS" --run-dir "$RUN_DIR" --resume auto)
if [[ -n "$VAL_SHARDS" ]]; then TRAIN_ARGS+=(--val-shards "$VAL_SHARDS"); fi
LAUNCH=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "$NUM_NODES" ]]; then LAUNCH+=(--num_nodes "$NUM_NODES"); fi
if [[ -n "$NUM_GPUS" ]]; then LAUNCH+=(--num_gpus "$NUM_GPUS"); fi

exec "$DEEPSPEED" "${LAUNCH[@]}" --module vlm_dist.train "${TRAIN_ARGS[@]}" "$@"
