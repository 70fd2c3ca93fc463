"""Benchmark the training engine: DeepSpeed step overhead vs plain PyTorch, and ZeRO-2 memory per rank.

    HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=.torch_extensions .venv/bin/python tools/bench_engine.py --json bench_engine.json
    .venv/bin/python tools/bench_engine.py --quick                 # smoke run (tiny preset, 2 repeats)
    .venv/bin/python tools/bench_engine.py --parts memory          # only the 2-rank memory comparison

Both parts use the project's ds_configs/demo_zero2.json (AdamW with "torch_adam": true, so DeepSpeed
steps the very torch.optim.AdamW the plain loop uses; its ZeRO bucket settings) with three changes:
no LR scheduler (constant lr on both sides), gradient clipping OFF (0.0) on both sides, and the
stage / precision under test. The batch is tools/bench_model.py's synthetic batch (random images,
captions of random length with padding and IGNORE_INDEX targets), the same on every side.

1. Overhead (one process): tools/benchlib/engine_overhead.py (method in its docstring).
2. ZeRO-2 memory (2 rank processes): tools/benchlib/engine_memory.py (method in its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_model, benchlib

from benchlib.engine_common import setup_device  # noqa: E402
from benchlib.engine_memory import memory_worker, render_memory, run_ranks  # noqa: E402
from benchlib.engine_overhead import bench_overhead, render_overhead  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Method and what is counted: see tools/benchlib/engine_overhead.py and engine_memory.py.")
    p.add_argument("--parts", default="overhead,memory", help="overhead, memory or both. Default: %(default)s")
    p.add_argument("--runs", default="demo:32,tiny:32", help="PRESET:BATCH list for the overhead part. Default: %(default)s")
    p.add_argument("--repeats", type=int, default=9, help="Timed steps per variant (interleaved). Default: %(default)s")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per variant first. Default: %(default)s")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="Overhead part: fp32 on both sides (default), or bf16 = plain autocast vs engine bf16 (GPU).")
    p.add_argument("--memory-preset", default="demo:16", help="PRESET:BATCH for the memory part. Default: %(default)s")
    p.add_argument("--memory-precisions", default="fp32,bf16", help="Precisions of the memory part. Default: %(default)s")
    p.add_argument("--bucket", type=int, default=None,
                   help="Override zero_optimization.reduce_bucket_size (elements) in the memory part.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available, else cpu.")
    p.add_argument("--quick", action="store_true", help="Smoke run: tiny preset, batch 8, 2 repeats, fp32 memory only.")
    p.add_argument("--timeout", type=int, default=300, help="Seconds allowed per 2-rank memory run. Default: %(default)s")
    p.add_argument("--json", type=Path, help="Also write the raw results (every step time, every count) to this file.")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one rank of a memory run
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device_name = setup_device(args.device)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return {}
    import torch

    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"overhead", "memory"}:
        raise SystemExit(f"--parts: expected overhead and/or memory, got {args.parts!r}")
    if args.quick:
        args.runs, args.repeats, args.warmup, args.memory_preset, args.memory_precisions = "tiny:8", 2, 1, "tiny:8", "fp32"
    precisions = [s.strip() for s in args.memory_precisions.split(",") if s.strip()]
    if set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--memory-precisions: expected fp32 and/or bf16, got {args.memory_precisions!r}")
    if device_name == "cuda" and "memory" in parts and torch.cuda.device_count() < 2:
        raise SystemExit(f"the memory part starts 2 ranks, one GPU each, but {torch.cuda.device_count()} GPU is visible; "
                         "run --parts overhead here, or --device cpu for the memory part")
    device = torch.device(device_name)
    load0 = os.getloadavg()
    import deepspeed

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device_name == "cuda"
           else f"cpu ({platform.machine()}, {os.cpu_count()} logical cores), no GPU used",
           "threads": torch.get_num_threads(), "loadavg_start": load0,
           "command": " ".join(["tools/bench_engine.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"torch {env['torch']} | deepspeed {env['deepspeed']} | {env['device']} | load {load0}", file=sys.stderr)
    t0 = time.perf_counter()
    result: dict = {"env": env, "overhead": [], "memory": []}
    if "overhead" in parts:
        from vlm_dist.train.engine import init_distributed

        init_distributed()  # a world of one
        for item in args.runs.split(","):
            preset, _, batch = item.partition(":")
            print(f"[{time.perf_counter() - t0:4.0f}s] overhead {preset} batch {batch}", file=sys.stderr)
            result["overhead"].append(bench_overhead(preset, int(batch), args.precision, args.repeats, args.warmup, device))
    if "memory" in parts:
        preset, _, batch = args.memory_preset.partition(":")
        for precision in precisions:
            for stage in (0, 2):
                print(f"[{time.perf_counter() - t0:4.0f}s] memory {precision} stage {stage} (2 ranks)", file=sys.stderr)
                spec = {"preset": preset, "batch": int(batch), "precision": precision, "stage": stage, "bucket": args.bucket}
                result["memory"].append(run_ranks(spec, 2, args.timeout))
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - t0
    lines = [f"torch {env['torch']}, deepspeed {env['deepspeed']}, {env['threads']} threads, {env['device']}; "
             f"load average {load0[0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end; {env['wall_s']:.0f} s", ""]
    if result["overhead"]:
        lines += render_overhead(result["overhead"]) + [""]
    if result["memory"]:
        lines += render_memory(result["memory"]) + [""]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

