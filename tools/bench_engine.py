"""Benchmark the training engine: DeepSpeed step overhead vs plain PyTorch, and ZeRO-2 memory per rank.

    HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=.torch_extensions .venv/bin/python tools/bench_engine.py --json bench_engine.json
    .venv/bin/python tools/bench_engine.py --quick                 # smoke run (tiny preset, 2 repeats)
    .venv/bin/python tools/bench_engine.py --parts memory          # only the 2-rank memory comparison

Both parts use the project's ds_configs/demo_zero2.json (AdamW with "torch_adam": true, so DeepSpeed
steps the very torch.optim.AdamW the plain loop uses; its ZeRO bucket settings) with three changes:
no LR scheduler (constant lr on both sides), gradient clipping OFF (0.0) on both sides, and the
stage / precision under test. The batch is tools/bench_model.py's synthetic batch (random images,
captions of random length with padding and IGNORE_INDEX targets), the same on every side.

1. Overhead (one process, world of one). Three models with the same state dict: plain PyTorch
   (zero_grad(set_to_none) -> loss.backward() -> AdamW.step(), weight-decay groups from
   vlm_dist.train.engine.param_groups) and DeepSpeed engines at ZeRO stage 0 and stage 2
   (engine(batch) -> engine.backward(loss) -> engine.step()). Precision fp32 on both sides by
   default: plain bf16 would be autocast over fp32 weights, while engine bf16 casts the module and
   keeps fp32 master weights in the optimizer wrapper, i.e. a different algorithm whose time
   difference is not engine overhead. (--precision bf16 times exactly that pair, for GPUs.)
   After --warmup untimed steps each, the variants are stepped in turn, the order rotating each
   round (A B C, B C A, ...), so drift in the machine's load hits all alike. Reported: median
   (min..max) step time; the ratio engine/plain of medians, of minima, and "paired" (median over
   rounds of engine step / plain step in the same round); the median process CPU time per step
   (less sensitive to other jobs on a shared CPU) and its ratio; and the largest loss
   difference to plain over all steps (fp32 stage 0 must track plain to float round-off: same algorithm).

2. ZeRO-2 memory (2 ranks as processes, RANK/WORLD_SIZE/MASTER_* set as tests/helpers.py does;
   one process pair per (precision, stage)). Each rank runs one training step and counts the bytes
   it holds, deduplicated by storage, with model weights excluded, in these classes (names from
   DeepSpeed 0.19.8's source):
     - grads held after backward: model params' .grad (stage 0: full-size, model dtype) plus ZeRO-2's
       averaged_gradients / grads_in_partition (this rank's reduced partition);
     - grads at the optimizer step: additionally the .grad of the parameters the inner torch AdamW
       updates (fp32 copies made inside step: stage-0 bf16 = FP16_UnfusedOptimizer fp32_groups[*].grad,
       stage 2 = single_partition_of_fp32_groups[*].grad), read in a post-hook of the inner AdamW;
     - Adam moments: the inner AdamW's state (exp_avg, exp_avg_sq, step);
     - fp32 master weights: the inner AdamW's params where they are not the model's own storage
       (stage-0 fp32: none, AdamW steps the model; stage-0 bf16: fp32_groups, full size;
       stage 2: single_partition_of_fp32_groups, this rank's partition, in fp32 AND bf16);
     - other: any further tensor reachable from the engine's optimizer object (a generic walk).
   The ZeRO-2 reduce bucket (ipg_buckets[*].buffer: reduce_bucket_size elements, allocated at each
   backward and released at its end) is transient like activations; it is reported on its own.
   Steady-state held total = the larger gradient point + Adam moments + fp32 master + other.
   Cross-check: the rank's RSS (glibc mmap threshold pinned and malloc_trim(0) before each reading,
   so freed buffers leave the RSS) at model built / end of backward / after step, against the counted
   bytes (plus the change in weight bytes at initialize: bf16 casts the module). The change from end
   of backward to after step (Adam moments allocated, gradients freed) should match; growth since the
   model was built also holds one-time allocations of the first step that are not counted. On a GPU
   torch.cuda.memory_allocated replaces the RSS (the memory part needs 2 GPUs there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ (bench_model) when imported from elsewhere

MIB = 2**20


def _setup_device(device: str) -> str:
    """Pick cpu/cuda before deepspeed is imported (its accelerator is chosen at import); fail fast."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu")
    device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    os.environ["DS_ACCELERATOR"] = device
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return device


def ds_config(stage: int, precision: str, micro: int) -> dict:
    from vlm_dist.train.dsconfig import load_ds_config

    ds = load_ds_config(REPO / "ds_configs" / "demo_zero2.json")
    ds.pop("scheduler", None)  # constant lr: the plain loop has no scheduler
    ds["gradient_clipping"] = 0.0  # off on both sides
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["zero_optimization"]["stage"] = stage
    ds["train_micro_batch_size_per_gpu"] = micro
    return ds


def build_model(preset: str, state: dict | None, device):
    import torch
    from vlm_dist.config import load_config
    from vlm_dist.model.vlm import VLM

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = VLM(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    return cfg, model.to(device).train()


# --- 1. overhead: plain PyTorch vs engine stage 0 vs engine stage 2, one rank -----------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(preset: str, batch: int, precision: str, device):
    """name -> step() returning (seconds, loss); all from one state dict, stepping one batch."""
    import torch
    from bench_model import make_batch
    from vlm_dist.train.engine import build_engine, param_groups

    cfg, ref = build_model(preset, None, device)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    images, ids, targets = make_batch(cfg, batch, ref.vocab_size, device)
    opt_params = ds_config(0, precision, batch)["optimizer"]["params"]
    hyper = {k: opt_params[k] for k in ("lr", "betas", "eps")}

    def plain():
        _, model = build_model(preset, state, device)
        opt = torch.optim.AdamW(param_groups(model, opt_params["weight_decay"]), **hyper)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = model(images, ids, targets)["loss"]
            loss.backward()
            opt.step()
            return loss
        return step

    def engine(stage: int):
        _, model = build_model(preset, state, device)
        eng = build_engine(model, ds_config(stage, precision, batch))
        img = images.to(torch.bfloat16 if precision == "bf16" else torch.float32)  # the engine casts the module only

        def step():
            loss = eng(img, ids, targets)["loss"]
            eng.backward(loss)
            eng.step()
            return loss
        return step, eng

    s0, e0 = engine(0)
    s2, e2 = engine(2)
    kinds = {"plain": "torch.optim.AdamW", "ds0": type(e0.optimizer).__name__, "ds2": type(e2.optimizer).__name__}
    n_params = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
    return {"plain": plain(), "ds0": s0, "ds2": s2}, kinds, n_params, cfg


def timed(step, device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss). CPU time is less sensitive to other jobs on a shared CPU."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def bench_overhead(preset: str, batch: int, precision: str, repeats: int, warmup: int, device) -> dict:
    variants, kinds, n_params, cfg = make_variants(preset, batch, precision, device)
    names = list(variants)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    losses = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            losses[n].append(timed(variants[n], device)[2])
    for r in range(repeats):
        for n in names[r % 3:] + names[:r % 3]:  # rotate the order each round
            t, c, loss = timed(variants[n], device)
            times[n].append(t)
            cpu[n].append(c)
            losses[n].append(loss)
    out = {"preset": preset, "batch": batch, "precision": precision, "repeats": repeats, "warmup": warmup,
           "params": n_params, "optimizers": kinds, "threads": __import__("torch").get_num_threads(), "variants": {}}
    for n in names:
        d = max(abs(a - b) for a, b in zip(losses[n], losses["plain"]))
        out["variants"][n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]),
                              "max_s": max(times[n]), "times_s": times[n], "cpu_s": cpu[n],
                              "cpu_median_s": statistics.median(cpu[n]), "losses": losses[n], "max_dloss": d,
                              # per round, this variant's step / plain's step of the same round (drift cancels)
                              "paired_ratio": statistics.median(a / b for a, b in zip(times[n], times["plain"]))}
    return out


# --- 2. memory: what each rank holds (runs inside one rank process) -------------------------------

def _rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return 1024 * int(line.split()[1])
    except OSError:
        pass
    return 0


def _mem_now(device) -> int:
    """Live bytes: CUDA allocator on a GPU; else RSS after gc and glibc malloc_trim(0), so freed heap
    chunks below the mmap threshold do not linger in the RSS."""
    import gc

    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss()


def _weight_bytes(model) -> int:
    return sum({(p.untyped_storage().data_ptr()): p.untyped_storage().nbytes() for p in model.parameters()}.values())


class Ledger:
    """Bytes by class, each storage counted once; model weights (and their views) never counted."""

    def __init__(self, model) -> None:
        self.weights = {self._key(t) for t in [*model.parameters(), *model.buffers()]}
        self.seen: set = set()
        self.bytes: dict[str, int] = {}

    @staticmethod
    def _key(t):
        return (t.device.type, t.untyped_storage().data_ptr())

    def add(self, cls: str, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = self._key(t)
        if key in self.weights or key in self.seen or t.untyped_storage().nbytes() == 0:
            return
        self.seen.add(key)
        self.bytes[cls] = self.bytes.get(cls, 0) + t.untyped_storage().nbytes()

    def walk(self, cls: str, obj, depth: int = 4, _ids=None) -> None:
        """Every tensor reachable from obj through attributes, lists, tuples and dicts (bounded depth)."""
        import torch
        from torch import nn

        _ids = set() if _ids is None else _ids
        if id(obj) in _ids or depth < 0 or isinstance(obj, (nn.Module, str, bytes, int, float)):
            return
        _ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(cls, obj)
            self.add(cls, obj.grad)
            return
        if isinstance(obj, dict):
            items = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            self.walk(cls, item, depth - 1, _ids)


def count_held(engine, model, inner_params: list) -> dict[str, int]:
    """The classes of the module docstring, at this moment. inner_params: every parameter of the inner
    AdamW, listed before the first step (ZeRO-2 hands it one param group at a time while stepping)."""
    opt, inner = engine.optimizer, engine.basic_optimizer
    led = Ledger(model)
    for st in inner.state.values():
        for v in st.values():
            led.add("adam_moments", v)
    for p in inner_params:
        led.add("master_fp32", p)
    for p in inner_params:
        led.add("grads_for_optimizer", p.grad)
    for p in model.parameters():
        led.add("grads", p.grad)
    for name in ("averaged_gradients", "grads_in_partition"):
        led.walk("grads", getattr(opt, name, None))
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        for buf in bucket.buffer:
            led.add("reduce_bucket", buf)
    led.walk("other", opt)
    return led.bytes


def memory_worker(spec: dict) -> dict:
    import torch
    from bench_model import make_batch
    from vlm_dist.train.engine import build_engine, init_distributed

    info = init_distributed()
    cfg, model = build_model(spec["preset"], None, info.device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ds = ds_config(spec["stage"], spec["precision"], spec["batch"])
    if spec.get("bucket"):
        ds["zero_optimization"]["reduce_bucket_size"] = spec["bucket"]
    mem = {"model_built": _mem_now(info.device)}
    weights0 = _weight_bytes(model)
    engine = build_engine(model, ds)
    mem["initialized"] = _mem_now(info.device)
    weights_delta = _weight_bytes(model) - weights0  # bf16 casts the module; ZeRO-2 moves it into flat buffers
    images, ids, targets = make_batch(cfg, spec["batch"], model.vocab_size, info.device, seed=info.rank)
    images = images.to(torch.bfloat16 if spec["precision"] == "bf16" else torch.float32)
    inner_params = [p for g in engine.basic_optimizer.param_groups for p in g["params"]]
    at_step: list[dict] = []  # one snapshot per inner AdamW step (ZeRO-2 steps it once per param group)
    bucket_bytes = [0]

    def post_hook(optimizer, args, kwargs):  # inside engine.step(): grads + moments + masters all alive
        at_step.append(count_held(engine, model, inner_params))
    engine.basic_optimizer.register_step_post_hook(post_hook)

    def grad_hook(_p):  # during backward, the reduce bucket exists: record its allocated size once
        if not bucket_bytes[0]:
            bucket_bytes[0] = sum(b.untyped_storage().nbytes() for bk in getattr(engine.optimizer, "ipg_buckets", {}).values()
                                  for b in bk.buffer)
    model.tok_emb.weight.register_post_accumulate_grad_hook(grad_hook)  # the last leaf to get its grad

    loss = engine(images, ids, targets)["loss"]
    engine.backward(loss)
    after_backward = count_held(engine, model, inner_params)
    mem["after_backward"] = _mem_now(info.device)
    engine.step()
    mem["after_step"] = _mem_now(info.device)
    after_step = count_held(engine, model, inner_params)
    return {**spec, "rank": info.rank, "world": info.world_size, "params": n_params,
            "optimizer": type(engine.optimizer).__name__, "loss": float(loss),
            "after_backward": after_backward, "at_step": at_step, "after_step": after_step,
            "bucket_bytes": bucket_bytes[0], "mem": mem, "weights_delta": weights_delta,
            "mem_method": "torch.cuda.memory_allocated" if info.device.type == "cuda" else "RSS"}


def run_ranks(spec: dict, world: int, timeout: int) -> list[dict]:
    """memory_worker once per rank, as separate processes (the env recipe of tests/helpers.py)."""
    from vlm_dist.train.dist import free_port

    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers > 64 KiB go back to the OS: RSS tracks live memory
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append((p.communicate(timeout=timeout)[0], p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for rank, (out, rc) in enumerate(outs):
        if rc != 0:
            raise RuntimeError(f"memory run {spec} rank {rank} failed (exit {rc}):\n{out[-4000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- report ----------------------------------------------------------------------------------------

def _spread(v: dict) -> str:
    return f"{v['median_s']:.3f} ({v['min_s']:.3f}..{v['max_s']:.3f})"


def render_overhead(rows: list[dict]) -> list[str]:
    lines = ["### DeepSpeed engine vs plain PyTorch: training step, seconds, 1 rank, interleaved", "",
             "| preset | batch | params | precision | steps each | plain AdamW: median (min..max) "
             "| ZeRO-0 engine | ZeRO-2 engine | ZeRO-0/plain: medians / mins / paired | ZeRO-2/plain: medians / mins / paired "
             "| CPU s/step, median: plain / ZeRO-0 / ZeRO-2 | CPU-time ratio ZeRO-0 / ZeRO-2 "
             "| max abs loss diff to plain (0 / 2) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variants"]
        ratio = lambda n: (f"{v[n]['median_s'] / v['plain']['median_s']:.3f} / {v[n]['min_s'] / v['plain']['min_s']:.3f}"  # noqa: E731
                           f" / {v[n]['paired_ratio']:.3f}")
        c = {n: v[n]["cpu_median_s"] for n in v}
        lines.append(f"| {r['preset']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['precision']} | {r['repeats']} "
                     f"| {_spread(v['plain'])} | {_spread(v['ds0'])} | {_spread(v['ds2'])} | {ratio('ds0')} "
                     f"| {ratio('ds2')} | {c['plain']:.2f} / {c['ds0']:.2f} / {c['ds2']:.2f} "
                     f"| {c['ds0'] / c['plain']:.3f} / {c['ds2'] / c['plain']:.3f} "
                     f"| {v['ds0']['max_dloss']:.1e} / {v['ds2']['max_dloss']:.1e} |")
    return lines


def held_summary(r: dict) -> dict[str, int]:
    """Steady-state held bytes: grads at their larger point (end of backward, or the largest of the
    inner-AdamW snapshots) + Adam moments + fp32 master + other (these three persist: read after the step)."""
    grads = lambda c: c.get("grads", 0) + c.get("grads_for_optimizer", 0)  # noqa: E731
    g_bwd = grads(r["after_backward"])
    g_step = max(map(grads, r["at_step"]), default=0)
    after = r["after_step"]
    s = {"grads_after_backward": g_bwd, "grads_at_step": g_step, "adam": after.get("adam_moments", 0),
         "master": after.get("master_fp32", 0), "other": after.get("other", 0)}
    s["total"] = max(g_bwd, g_step) + s["adam"] + s["master"] + s["other"]
    s["total_no_master"] = s["total"] - s["master"]
    return s


def render_memory(runs: list[list[dict]]) -> list[str]:
    lines = ["### Gradient + optimizer-state bytes per rank, 2 ranks, one step (MiB)", "",
             "| precision | ZeRO stage | rank | inner optimizer wrapper | grads after backward | grads at optimizer step "
             "| Adam moments | fp32 master weights | other | held total | total / stage 0 "
             "| total without master / stage 0 | reduce bucket (transient, in backward) "
             "| cross-check: change from end of backward to after step, counted / measured "
             "| growth since model built, after step: counted / measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base: dict = {}
    for ranks in runs:
        for r in ranks:
            s = held_summary(r)
            key = (r["precision"], r["rank"])
            if r["stage"] == 0:
                base[key] = s
            b = base.get(key)
            ratio = f"{s['total'] / b['total']:.3f}" if b else ""
            ratio_nm = f"{s['total_no_master'] / b['total']:.3f}" if b else ""
            m, wd = r["mem"], r["weights_delta"]
            counted_bwd = wd + sum(v for k, v in r["after_backward"].items() if k != "reduce_bucket")
            counted_step = wd + sum(r["after_step"].values())
            rss = (f"{(counted_step - counted_bwd) / MIB:+.1f} / {(m['after_step'] - m['after_backward']) / MIB:+.1f} "
                   f"| {counted_step / MIB:.1f} / {(m['after_step'] - m['model_built']) / MIB:.1f}")
            f = lambda x: f"{x / MIB:.1f}"  # noqa: E731
            lines.append(f"| {r['precision']} | {r['stage']} | {r['rank']} | {r['optimizer']} | {f(s['grads_after_backward'])} "
                         f"| {f(s['grads_at_step'])} | {f(s['adam'])} | {f(s['master'])} | {f(s['other'])} "
                         f"| {f(s['total'])} | {ratio} | {ratio_nm} | {f(r['bucket_bytes'])} | {rss} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Method and what is counted: see the module docstring of tools/bench_engine.py.")
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
    device_name = _setup_device(args.device)
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
