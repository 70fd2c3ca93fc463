#!/usr/bin/env bash
# The shipped path end to end, as a user runs it, at a preset's width with a random frozen tower (nothing can be
# downloaded): demo data -> precompute-features (the frozen tower once) -> training on the features
# (model.compile, validation, the in-training generation eval, a checkpoint) -> export -> eval, greedy and
# speculative, each with the decoding steps the device picks (CUDA graphs on a GPU) and with --dynamic -> one
# speculative-sampling `generate`. It prints how many texts differ between the four evaluations and fails above 1 % (on a GPU the two kinds of steps run
# different kernels, so a near-tie may round either way; on a CPU tests/test_gpu_e2e.py requires none). Made for a
# GPU session's few minutes (tools/bench_gpu.py times the parts; this checks that they work together);
# CONFIG=tiny FIRST=--static runs it on a CPU (tests/test_gpu_e2e.py).
#   bash tools/gpu_e2e.sh                 # base, one GPU, ~4 min
#   W=/tmp/e2e CONFIG=tiny STEPS=4 N_TRAIN=64 N_VAL=8 FIRST=--static bash tools/gpu_e2e.sh
set -euo pipefail
W=$(realpath -m "${W:-/tmp/gpu_e2e}")       # data/, features/, run/, export/, eval_*.json
cd "$(dirname "$0")/.."

FIRST=${FIRST:-}                            # the first two evaluations' steps: empty = the device's choice; --static
CONFIG=${CONFIG:-base}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
STEPS=${STEPS:-60}                          # training steps; validation, generation eval and a save at the last
N_TRAIN=${N_TRAIN:-2048}
N_VAL=${N_VAL:-64}
VLM_DIST=${VLM_DIST:-python3 -m vlm_dist.cli}  # split at spaces: no spaces inside the interpreter's path
read -r -a VD <<< "$VLM_DIST"
SETS=(--set model.vision.pretrained=null --set model.vision.allow_random_frozen=true --set model.vision.freeze=true)

phase() {  # phase NAME COMMAND...: run it and print its wall time
  local name=$1 t0=$SECONDS
  shift
  "$@"
  echo "[e2e] $name: $((SECONDS - t0)) s" >&2
}

if [ -e "$W/run/checkpoints" ]; then  # its training would resume at the last step and check nothing again
  echo "[e2e] $W holds an earlier run: pass a new W=... or delete it (rm -rf $W)" >&2
  exit 2
fi
phase data "${VD[@]}" demo-data --out "$W/data" --train "$N_TRAIN" --val "$N_VAL" --shard
for split in train val; do
  phase "features $split" "${VD[@]}" precompute-features --shards "$W/data/shards/$split" --out "$W/features/$split" \
    --config "$CONFIG" "${SETS[@]}"
done
phase train "${VD[@]}" train --config "$CONFIG" --ds "$DS_CONFIG" --train-shards "$W/features/train" \
  --val-shards "$W/features/val" --run-dir "$W/run" "${SETS[@]}" --set train.max_steps="$STEPS" \
  --set train.eval_every="$STEPS" --set train.generate_every="$STEPS" --set train.save_every="$STEPS" \
  --set train.generate_images="$N_VAL" --set log.log_every=10
phase export "${VD[@]}" export --ckpt "$W/run/checkpoints" --tag latest --out "$W/export"
for steps in first dynamic; do
  flag=$FIRST; [[ $steps == dynamic ]] && flag=--dynamic
  for how in greedy speculative; do
    spec=; [[ $how == speculative ]] && spec=--speculative
    # shellcheck disable=SC2086  # $flag and $spec: one flag or none
    phase "eval $how, ${flag:-device-chosen} steps" "${VD[@]}" eval --model "$W/export" --shards "$W/features/val" \
      --out "$W/eval_${how}_$steps.json" $flag $spec
  done
done
python3 - "$W" <<'EOF'
import json, sys
from pathlib import Path

names = [f"eval_{how}_{steps}" for steps in ("first", "dynamic") for how in ("greedy", "speculative")]
runs = {n: json.loads((Path(sys.argv[1]) / f"{n}.json").read_text()) for n in names}
preds = {name: [t["prediction"] for t in r["predictions"]] for name, r in runs.items()}
for name, r in runs.items():
    m = r["metrics"]
    print(f"[e2e] {name}: {m['decode_tokens_per_s']:.0f} tokens/s, caption exact match {m['caption_exact_match']:.3f}, "
          f"Q&A {m['qa_accuracy']:.3f}" + (f", {m['speculative']['tokens_per_call']:.2f} tokens per call"
                                            if "speculative" in m else ""), file=sys.stderr)
first = preds[names[0]]
differ = {name: sum(a != b for a, b in zip(first, p)) for name, p in preds.items() if name != names[0]}
print(f"[e2e] {len(first)} texts; differing from {names[0]}: {differ}", file=sys.stderr)
if not first or any(len(p) != len(first) for p in preds.values()) or max(differ.values()) > len(first) // 100:
    sys.exit("[e2e] FAILED: the evaluations disagree")
EOF
# speculative sampling on the device the export decodes on (its uniforms come from the CLI's CPU generator)
# (sed reads the whole list: `head -n 1` would close the pipe early and, with pipefail, fail the script on
# `sort`'s SIGPIPE once the list outgrows the pipe's 64 KiB, as the default 2112 images' does)
image=$(find "$W/data/images" -name '*.jpg' | sort | sed -n 1p)
phase "generate, speculative sampling" "${VD[@]}" generate --model "$W/export" --image "$image" --image "$image" \
  --speculative --temperature 0.7 --max-new-tokens 8 --seed 1
