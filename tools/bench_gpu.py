"""The one-GPU benchmark: training step, MFU, memory, optimizer, loader, decoding, model.compile (~8 min, H100).

    python tools/bench_gpu.py                      # one H100/H200: prints the table, appends it to docs/BENCHMARKS.md
    python tools/bench_gpu.py --json gpu.json      # also the raw numbers
    python tools/bench_gpu.py --cpu-smoke          # every code path on the CPU, tiny shapes, < 1 min (tests run this)

What it measures (no download: random weights, model.vision.pretrained=null, the base preset's shapes):
1. Training step of the `base` preset (ViT-B-32 tower frozen + 24 x 768 decoder, n_future=4, compiled
   as the preset says: model.compile, regional torch.compile; the profile part likewise) on the
   trainer's own DeepSpeed engine (vlm_dist.train.engine.build_engine, ds_configs/zero2.json: bf16,
   ZeRO-2, torch AdamW; one rank) with a synthetic batch at COCO shapes (49 image tokens + 31 text
   positions, captions of random length, padded): step time, samples/s, tokens/s, TFLOP/s and MFU
   for a micro-batch sweep up to the largest that fits, activation checkpointing on and off at each
   size (time, torch.cuda.max_memory_allocated), and which SDPA kernel the decoder's attention ran.
   MFU = FLOPs per step / step time / the card's dense bf16 peak (H100 SXM, H200: 989 TFLOP/s), with
       FLOPs per step = 3 x forward(decoder blocks + LM head on target positions)   [= 6N per token]
                      + forward(frozen vision tower) + 2 x forward(projector)        [2N per token]
                      + attention scores 3 x 4 S^2 D per layer                        (S = 80, D = 768)
   from vlm_dist.observe.flops.train_flops (the same count the trainer logs; recompute not counted).
2. Where a step's time goes: torch.profiler over 3 steps at the best micro-batch, the kernels with the
   most device time (part "profile"); the ZeRO reduce bucket: ds_configs' fixed 5e7 elements vs the
   model's trainable size (part "bucket"); torch's AdamW foreach vs fused (part "optimizer");
   model.compile's regions (the head loss's chunk kernels, the decoder blocks, the vision tower, all:
   inductor) at the best micro-batch vs eager, checkpointing on and off, and a profile of the fastest
   (part "compile", run last by default: the slowest to warm up). The card's own
   bf16 matmul rate (8192^3) is measured first and printed beside the datasheet peak.
   With --json, the raw numbers are rewritten after every part, so a run cut short keeps what finished.
3. Loader: vlm_dist.data's streaming loader images/s with 4, 8 and 16 workers on shards of
   COCO-sized (640x480, photo-like) JPEGs this script makes, on the same shards resized to 224, and on
   their precompute-features shards (the frozen tower's tokens: no decoding), against the GPU's
   samples/s; and precompute-features' own images/s (tower on the GPU, JPEGs decoded by every core).
4. Decoding at base width: KV-cached greedy vs self-speculative tokens/s, batch 1 and 8. With --decode-model
   EXPORT, of a trained export instead, on demo scenes: its heads' own acceptance (e.g. the demo recipe
   trained with --set model.n_future=4), which random weights cannot show.
Method details: tools/benchlib/*.py docstrings. --cpu-smoke runs the same code on the tiny preset
(bf16 ZeRO-2 on DeepSpeed's CPU accelerator, inductor's CPU backend) and never touches docs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_model, benchlib
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait on the hub

# compile last by default: the slowest to warm up
PARTS = ("train", "profile", "bucket", "optimizer", "decode", "loader", "compile")
SMOKE = {"preset": "tiny", "micros": "2,4", "warmup": 1, "steps": 1, "compile_variants": "off,all", "compile_ckpt": "on",
         "loader_workers": "0,2", "photos": 24, "loader_micro": 4, "decode_batches": "1,8", "new_tokens": 6,
         "decode_repeats": 1}
FULL = {"preset": "base", "micros": "8,16,32,64,128,256,512,1024", "warmup": 3, "steps": 10,
        "compile_variants": "off,loss,blocks,tower,all", "compile_ckpt": "both",
        "loader_workers": "4,8,16", "photos": 4096, "loader_micro": 32, "decode_batches": "1,8", "new_tokens": 32,
        "decode_repeats": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What and how: see the module docstring of tools/bench_gpu.py.")
    p.add_argument("--cpu-smoke", action="store_true", help="Run every part on the CPU at tiny shapes (< 1 min); no docs/ append.")
    p.add_argument("--parts", default=",".join(PARTS), help=f"Any of {','.join(PARTS)}, run in the order given. Default: %(default)s")
    p.add_argument("--ds", default=str(REPO / "ds_configs" / "zero2.json"), help="DeepSpeed JSON (ZeRO-2, bf16). Default: ds_configs/zero2.json")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE", help="Override a DeepSpeed field (repeatable).")
    for key, help_ in [("preset", "Run-config preset"), ("micros", "Micro-batch sweep (ascending, stops at OOM)"),
                       ("warmup", "Untimed steps before each measurement"), ("steps", "Timed steps per measurement"),
                       ("compile_variants", "model.compile regions measured side by side: off, loss, blocks, tower, all"),
                       ("compile_ckpt", "Checkpointing in the compile part: best (as the best sweep row), on, off or both"),
                       ("loader_workers", "Loader worker counts"),
                       ("photos", "640x480 photos made for the loader part"), ("loader_micro", "Loader micro-batch"),
                       ("decode_batches", "Decoding batch sizes"), ("new_tokens", "Tokens decoded per row"),
                       ("decode_repeats", "Alternating greedy/speculative repeats")]:
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                       help=f"{help_}. Default: {FULL[key]} ({SMOKE[key]} with --cpu-smoke)")
    p.add_argument("--decode-model", type=Path, default=None,
                   help="A trained export (vlm-dist export, n_future > 1) for the decode part, decoded on rendered demo "
                        "scenes, instead of the preset's random weights: speculative decoding with trained heads' acceptance")
    p.add_argument("--workdir", type=Path, help="Where the photos and shards go (default: a temporary folder)")
    p.add_argument("--append", type=Path, default=None,
                   help="Markdown file to append the table to. Default: docs/BENCHMARKS.md on a GPU, nothing with --cpu-smoke")
    p.add_argument("--json", type=Path, help="Also write every raw number here.")
    args = p.parse_args(argv)
    defaults = SMOKE if args.cpu_smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif isinstance(value, int):
            setattr(args, key, int(getattr(args, key)))
    if args.decode_model is not None and not (args.decode_model / "config.json").is_file():
        p.error(f"--decode-model {args.decode_model}: not an export folder (no config.json); make one with "
                "`vlm-dist export --ckpt RUN/checkpoints --out DIR`")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.compile_ckpt not in ("best", "on", "off", "both"):
        p.error(f"--compile-ckpt: best, on, off or both, not {args.compile_ckpt!r}")
    args.compile_variants = [v.strip() for v in args.compile_variants.split(",") if v.strip()]
    if not args.compile_variants or set(args.compile_variants) - {"off", "loss", "blocks", "tower", "all"}:
        p.error(f"--compile-variants: any of off, loss, blocks, tower, all, not {args.compile_variants!r}")
    if args.append is None and not args.cpu_smoke:
        args.append = REPO / "docs" / "BENCHMARKS.md"
    return args


def ints(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def pick_device(cpu_smoke: bool) -> str:
    """cuda, or fail fast (before DeepSpeed picks its accelerator at import) unless --cpu-smoke."""
    import torch

    if cpu_smoke:
        os.environ["DS_ACCELERATOR"] = "cpu"
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an "
                         "H100/H200, or use --cpu-smoke to check every code path on the CPU.")
    os.environ["DS_ACCELERATOR"] = "cuda"
    return "cuda"


def run_part(name: str, results: dict, fn, dump=None) -> None:
    """Run one part; a failure is recorded (and printed) and the other parts still run. `dump(results)`
    after each part, so a run cut short (a lease's time limit) still leaves every finished part."""
    t = time.perf_counter()
    print(f"[{name}]", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 -- one GPU session: never lose the other parts
        traceback.print_exc()
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    results.setdefault("seconds", {})[name] = time.perf_counter() - t
    if dump:
        dump(results)


def part_train(bench, args) -> dict:
    out = {"sdpa": bench.sdpa(ints(args.micros)[0]), "rows": bench.sweep(ints(args.micros), ckpt_both=True)}
    bench.log(f"  SDPA kernel(s) of the decoder: {', '.join(out['sdpa'])}")
    return out


def best_row(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r.get("status") == "ok"]
    return max(ok, key=lambda r: r["samples_s"]) if ok else None


def part_profile(bench, args, results) -> dict:
    best = best_row(results.get("train", {}).get("rows", [])) or {"micro": ints(args.micros)[0], "ckpt": True}
    out = bench.profile(best["micro"], best["ckpt"], top=25)
    out["host"] = bench.profile(ints(args.micros)[0], True, host=True)  # the smallest: where the host sets the pace
    return out


def matmul_ceiling(device) -> dict:
    """The card's measured bf16 matmul rate (8192^3, random data, median of 20 after 5 warm-ups): the
    ceiling a real kernel reaches, beside the datasheet peak that MFU divides by."""
    import statistics

    import torch

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"n": n, "tflops": 2 * n**3 / statistics.median(times) / 1e12}


def part_compile(bench, args, results) -> dict:
    """model.compile's regions (--compile-variants: off, loss, blocks, tower, all) side by side on one engine,
    at the best micro-batch, for each checkpointing setting asked; then a profile of the fastest compiled
    row, so the next bottleneck is in the record."""
    best = best_row(results.get("train", {}).get("rows", [])) or {"micro": ints(args.micros)[-1], "ckpt": True}
    ckpts = {"best": [best["ckpt"]], "on": [True], "off": [False], "both": [True, False]}[args.compile_ckpt]
    rows = [bench.measure(best["micro"], ckpt, compiled=what) for ckpt in ckpts for what in args.compile_variants]
    fastest = best_row(rows)
    if fastest is not None and bench.cfg.model.vision.freeze:  # the same step on precompute-features' tokens
        rows.append(bench.measure(fastest["micro"], fastest["ckpt"], compiled=fastest["compiled"], features=True))
    out = {"micro": best["micro"], "rows": rows, "profile": None}
    if fastest is not None and fastest.get("compiled") not in (None, "off"):
        out["profile"] = bench.profile(fastest["micro"], fastest["ckpt"], top=25, compiled=fastest["compiled"])
    return out


def part_bucket(bench, args, results) -> dict:
    best = best_row(results.get("train", {}).get("rows", [])) or {"micro": ints(args.micros)[0], "ckpt": True}
    if bench.trainable is None:
        bench.get_engine()
    fixed = bench.ds.get("zero_optimization", {}).get("reduce_bucket_size", int(5e8))
    sizes = [int(fixed), int(bench.trainable)]
    out = {"trainable": bench.trainable, "rows": bench.measure_buckets(best["micro"], best["ckpt"], sizes)}
    if bench.ds.get("bf16", {}).get("enabled"):
        # DeepSpeed's bf16 per-parameter inf/NaN scan (~7 launches per parameter + a host sync per step,
        # docs/bench/gpu_round5.md): its cost where the host sets the pace, the smallest micro-batch. A
        # measurement only: turning it off also lets a non-finite gradient norm reach the weights.
        micro = ints(args.micros)[0]
        out["overflow_check"] = bench.measure_ds_variants(micro, True, [
            ("check_grad_overflow on (default)", {}),
            ("check_grad_overflow off", {"bf16": {**bench.ds["bf16"], "check_grad_overflow": False}})])
    return out


def part_optimizer(bench, args, results) -> dict:
    """torch's AdamW on ZeRO's flat fp32 partitions (DeepSpeed `torch_adam`): the default (foreach: ~15
    kernels over every element) against fused=True (one kernel), at the best micro-batch, a fresh engine
    each; the update is the same AdamW."""
    best = best_row(results.get("train", {}).get("rows", [])) or {"micro": ints(args.micros)[-1], "ckpt": True}
    opt = bench.ds.get("optimizer", {})
    if not opt.get("params", {}).get("torch_adam"):
        return {"rows": [], "skipped": "the DeepSpeed config's optimizer is not torch's AdamW (torch_adam)"}
    fused = {"optimizer": {**opt, "params": {**opt["params"], "fused": True}}}
    return {"rows": bench.measure_ds_variants(best["micro"], best["ckpt"], [
        ("torch AdamW, foreach (default)", {}), ("torch AdamW, fused=True", fused)])}


def part_loader(cfg, args) -> dict:
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            return loader_rows(cfg, args, Path(tmp))
    return loader_rows(cfg, args, args.workdir)


def loader_rows(cfg, args, workdir: Path) -> dict:
    from benchlib.loader_bench import loader_throughput, make_photo_shards

    t = time.perf_counter()
    size = cfg.model.vision.geometry["image_size"]
    shards = make_photo_shards(workdir, args.photos, workers=os.cpu_count() or 1, resize=size)
    made = {"photos": shards["n"], "mean_kib": shards["mean_kib"], "make_s": time.perf_counter() - t, "resize": size}
    print(f"  {shards['n']} photos ({shards['mean_kib']:.0f} KiB mean) + shards, as they are and resized to {size}, "
          f"in {made['make_s']:.1f} s", file=sys.stderr)
    from vlm_dist.data.features import precompute_features

    t = time.perf_counter()  # the frozen tower once over the resized shards, on the benchmark's device
    feats = precompute_features(str(shards["shards_resized"]), workdir / "features", cfg, batch_size=256,
                                workers=os.cpu_count() or 1, progress=False)
    made["precompute"] = {"images_s": feats["samples"] / (time.perf_counter() - t), "device": feats["device"],
                          "dtype": feats["dtype"], "kib_per_sample": feats["bytes"] / max(feats["samples"], 1) / 1024}
    print(f"  precompute-features: {made['precompute']['images_s']:.0f} images/s ({feats['dtype']} on {feats['device']})",
          file=sys.stderr)
    shards["features"] = workdir / "features"
    rows = []
    for key, label in [("shards", "640x480 JPEGs as they are"), ("shards_resized", f"shard-coco --resize {size}"),
                       ("features", "precompute-features (tower tokens)")]:
        for w in ints(args.loader_workers):
            row = {**loader_throughput(cfg, shards[key], w, args.loader_micro), "shards": label}
            print(f"  {label}, {w:2d} workers: {row['images_s']:.0f} images/s over the epoch, steady "
                  f"{row['steady_images_s'] or float('nan'):.0f}", file=sys.stderr)
            rows.append(row)
    return {**made, "cpus": os.cpu_count(), "rows": rows}


def part_decode(cfg, args, device) -> dict:
    import torch

    from benchlib.decode_bench import bench_decode, profile_decode
    from vlm_dist.model import VLM
    from vlm_dist.text import get_tokenizer, prompt_tokens

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches, images = ints(args.decode_batches), None
    if args.decode_model:  # trained heads on the scenes they learned to caption (unseen in training)
        from bench_decode import load_images
        from vlm_dist.infer.load import load_exported

        model, _ = load_exported(args.decode_model, device=device, dtype=dtype)
        images = load_images(model, None, max(batches)).to(device)
    else:
        model = VLM(cfg.model).to(device, dtype).eval()
    rows = bench_decode(model, batches, args.new_tokens, args.decode_repeats, log=lambda m: print(m, file=sys.stderr),
                        images=images)
    size = model.cfg.vision.geometry["image_size"]
    image = images[:1] if images is not None else torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    prof = profile_decode(model, image, prompt_tokens(get_tokenizer()), args.new_tokens)
    for name, p in prof.items():
        print(f"  profile, batch 1, {name}: {p['ms_per_token']:.2f} ms, {p['aten_ops_per_token']:.0f} aten ops, "
              f"{p['launches_per_token']:.0f} launches, {p['syncs_per_token']:.1f} syncs per token", file=sys.stderr)
    return {"dtype": str(dtype).removeprefix("torch."), "n_future": model.cfg.n_future, "rows": rows, "profile": prof,
            "model": str(args.decode_model) if args.decode_model else None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device_name = pick_device(args.cpu_smoke)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # ZeRO's, harmless
    import torch

    from benchlib.report import render
    from benchlib.train_bench import TrainBench, free_memory
    from bench_model import PRESET_OVERRIDES
    from vlm_dist.config import load_config
    from vlm_dist.train.engine import init_distributed
    from vlm_dist.train.dsconfig import load_ds_config, resolve_schedule

    t0 = time.perf_counter()
    device = torch.device(device_name)
    # --cpu-smoke freezes tiny's tower as base's is, so that the tower-features row runs too
    frozen = ["model.vision.freeze=true"] if args.cpu_smoke else []
    cfg = load_config(args.preset, PRESET_OVERRIDES.get(args.preset, []) + ["model.vision.pretrained=null"] + frozen)
    ds = load_ds_config(args.ds, args.ds_set)
    resolve_schedule(ds, 10_000, "the benchmark")  # fills "auto"; the LR schedule does not change step time
    info = init_distributed()  # a world of one (MASTER_* filled in)
    import deepspeed

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), --cpu-smoke",
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda,
           "preset": args.preset, "ds": Path(args.ds).name, "ds_set": args.ds_set, "world": info.world_size,
           "bf16": bool(ds.get("bf16", {}).get("enabled")),  # "auto" resolved: off on a CPU without native bf16
           "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
           "command": " ".join(["python tools/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"{env['device']} | torch {env['torch']} | deepspeed {env['deepspeed']} | preset {args.preset}", file=sys.stderr)
    bench = TrainBench(cfg, ds, device, warmup=args.warmup, steps=args.steps, log=lambda m: print(m, file=sys.stderr))
    env["peak_flops"] = bench.peak
    env["matmul"] = matmul_ceiling(device) if device.type == "cuda" else None
    if env["matmul"]:
        print(f"bf16 matmul {env['matmul']['n']}^3: {env['matmul']['tflops']:.0f} TFLOP/s measured", file=sys.stderr)
    if device.type == "cuda" and bench.peak is None:
        print(f"warning: no dense bf16 peak known for {env['device']!r} (vlm_dist.observe.flops.PEAK_BF16): "
              "MFU is left out", file=sys.stderr)
    results: dict = {"env": env}

    def dump(res: dict) -> None:
        env["wall_s"] = time.perf_counter() - t0
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))

    steps = {"train": lambda: part_train(bench, args), "profile": lambda: part_profile(bench, args, results),
             "bucket": lambda: part_bucket(bench, args, results), "optimizer": lambda: part_optimizer(bench, args, results),
             "decode": lambda: part_decode(cfg, args, device), "loader": lambda: part_loader(cfg, args),
             "compile": lambda: part_compile(bench, args, results)}
    for name in args.parts:  # in the order given
        if name in ("decode", "loader"):  # neither needs the training engine: free its memory first
            bench.drop_engine()
            free_memory(device)
        run_part(name, results, steps[name], dump)
    bench.drop_engine()
    env["wall_s"] = time.perf_counter() - t0
    text = render(results)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.append}", file=sys.stderr)
    dump(results)
    return results


if __name__ == "__main__":
    main()
