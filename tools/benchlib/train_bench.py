"""Training-step measurements on the project's DeepSpeed engine (one rank), for tools/bench_gpu.py.

    bench = TrainBench(cfg, ds, device)          # cfg: RunConfig; ds: a DeepSpeed dict (load_ds_config)
    row = bench.measure(micro=64, ckpt=True)      # {"step_s", "samples_s", "tflops", "mfu", "peak_gib", ...}
    rows = bench.sweep([8, 16, 32, 64], ckpt_both=True)   # ascending; stops at the first OOM with checkpointing on
    row = bench.measure(micro=64, ckpt=True, compiled="all")   # model.compile's regions: off, loss, blocks, tower or all

The step is the trainer's own: `vlm_dist.train.engine.build_engine(VLM(cfg.model), ds)`, then
engine(images, ids, targets) -> engine.backward(loss) -> engine.step(), as vlm_dist/train/loop.py's
forward_backward() and optimizer_step() do (without the gradient observer and the per-step host
reads of losses: what is timed is the engine step itself). The batch is tools/bench_model.py's
synthetic one at the run config's shapes (base: 49 image tokens + 31 text positions = 80; captions of
random length 8..32 tokens, padded as the loader pads them), made once and kept on the device, so
data loading is not in the step time (the loader is measured on its own, loader_bench.py).

FLOPs per step come from vlm_dist.observe.flops.train_flops (matmul FLOPs written out in its
docstring: 3x the forward of the trained decoder blocks and LM head, i.e. 6 FLOPs per trained
parameter per token, plus the attention scores 3 * 4 * S^2 * D per layer, plus ONE forward (2N per
token) of the frozen vision tower and 2x the projector; checkpointing's recompute not counted). MFU =
achieved FLOP/s / the card's dense bf16 peak (vlm_dist.observe.flops.PEAK_BF16: H100 SXM and H200
989e12). Memory: torch.cuda.max_memory_allocated over the timed steps (peak) and that peak minus
torch.cuda.memory_allocated before them (the transient part: activations, logits, their gradients,
the reduce bucket); on the CPU the RSS probe of tools/bench_model.py stands in.

An out-of-memory error inside a ZeRO-2 step can leave the engine's gradient buckets half filled, so
after one the engine is dropped and the next measurement builds a fresh one.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback

import torch

from bench_model import MemoryProbe, make_batch  # tools/ is on sys.path (bench_gpu.py puts it there)
from vlm_dist.observe.flops import peak_flops, train_flops
from vlm_dist.text import IGNORE_INDEX

GIB = 2**30


# --- the project's training code path: keep every call into vlm_dist.train here ------------------

def build_trainer_engine(cfg, ds: dict, seed: int = 0):
    """The trainer's engine for a fresh model: the same calls as vlm_dist.train.loop.setup."""
    from vlm_dist.model import VLM
    from vlm_dist.train.engine import build_engine

    torch.manual_seed(seed)
    return build_engine(VLM(cfg.model), ds)


def engine_step(engine, images, ids, targets) -> torch.Tensor:
    """loop.forward_backward + loop.optimizer_step, minus observers: one micro-batch = one step."""
    loss = engine(images, ids, targets)["loss"]
    engine.backward(loss)
    engine.step()
    return loss


# --- helpers -------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


KERNEL_GROUPS = [  # (group, substrings of a kernel's name), first match wins; names as torch.profiler reports them
    ("attention (SDPA)", ("sdpa", "flash", "fmha", "attention")),
    ("inductor (fused, triton)", ("triton_",)),
    ("GEMM (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_")),
    ("softmax / loss", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("norm", ("layer_norm", "layernorm")),
    ("reduction", ("reduce_kernel",)),
    ("copy / cat / layout", ("copy", "cat", "transpose", "memcpy", "memset")),
    ("elementwise", ("elementwise",)),
]


def kernel_group(name: str) -> str:
    """What a profiled kernel (or op) is, coarsely, for a per-group sum of a step's device time."""
    low = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that reach the dispatcher (SDPA is already resolved to its backend there)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


SDPA_BACKENDS = {  # aten op the fused SDPA dispatched to -> what it is
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_attention_math": "math (unfused)",
    "_scaled_dot_product_fused_attention_overrideable": "backend-specific fused",
}


def sdpa_backends(module, images, ids) -> list[str]:
    """Which SDPA kernel the decoder's causal attention ran (forward, no grad, as in training shapes)."""
    with torch.no_grad():
        x = module.embed(images, ids)  # (B, S, D); the vision tower's own attention is not recorded
        rec = _OpNames()
        with rec:
            module.trunk(x)
    found = sorted({SDPA_BACKENDS.get(n.split(".")[0], n) for n in rec.names if "scaled_dot_product" in n})
    return found or ["none (no SDPA op ran: model.attention is not 'sdpa'?)"]


# --- the measurements ----------------------------------------------------------------------------

COMPILE_VARIANTS = ("off", "loss", "blocks", "tower", "all")


def set_compiled(module, what: str) -> None:
    """model.compile's regions on a live VLM, one part at a time: 'off', 'loss' (the head loss's compiled chunk
    kernels), 'blocks' (every decoder block's compiled forward), 'tower' (the vision tower as one graph) or
    'all' (= model.compile=true). The flags are read at every forward; compiled graphs stay cached, so
    switching back costs nothing."""
    if what not in COMPILE_VARIANTS:
        raise ValueError(f"compiled: one of {', '.join(COMPILE_VARIANTS)}, not {what!r}")
    module.compile_regions(tower=what in ("tower", "all"), blocks=what in ("blocks", "all"), loss=what in ("loss", "all"))


class TrainBench:
    """One engine at a time; activation checkpointing is switched on the live model (the flag is
    read at every forward), so on/off share weights, optimizer state and allocator."""

    def __init__(self, cfg, ds: dict, device: torch.device, warmup: int = 3, steps: int = 10, log=print):
        self.cfg, self.ds, self.device, self.warmup, self.steps, self.log = cfg, ds, device, warmup, steps, log
        self.engine = None
        self.trainable = None  # trainable parameters (elements), known once an engine is built
        self.dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
        self.peak = peak_flops(device)
        self.batches: dict[tuple[int, bool], tuple] = {}  # (micro, features) -> (data, counts)
        self.probe = MemoryProbe(device)

    def get_engine(self):
        if self.engine is None:
            t = time.perf_counter()
            self.engine = build_trainer_engine(self.cfg, self.ds)
            self.trainable = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
            self.log(f"  engine built in {time.perf_counter() - t:.1f} s ({type(self.engine.optimizer).__name__})")
        return self.engine

    def drop_engine(self) -> None:
        """Free the engine's memory: DeepSpeedEngine.destroy() first, without which something in
        DeepSpeed 0.19.8 keeps the engine (weights, fp32 master, Adam moments) alive after `del`."""
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        free_memory(self.device)

    def batch(self, micro: int, features: bool = False):
        """(images in the engine's dtype, ids, targets) on the device + host-side counts, cached per size.
        features=True: the images are the frozen tower's tokens (B, P, W) instead, as precompute-features
        shards give them (random values: the step's cost does not depend on them)."""
        if (micro, features) not in self.batches:
            vocab = self.get_engine().module.vocab_size
            images, ids, targets = make_batch(self.cfg, micro, vocab, torch.device("cpu"))
            if features:
                module = self.engine.module
                images = torch.randn(micro, module.n_image_tokens, module.vision.width)
            counts = {"n_targets": int((targets != IGNORE_INDEX).sum()),  # all heads: the LM head runs there
                      "text_tokens": int((targets[:, 0] != IGNORE_INDEX).sum()),  # next-token targets, as the loop counts
                      "seq": self.cfg.model.n_image_tokens + ids.shape[1], "text_len": ids.shape[1]}
            dev = self.device
            self.batches[micro, features] = ((images.to(dev, self.dtype), ids.to(dev), targets.to(dev)), counts)
        return self.batches[micro, features]

    def _timed_steps(self, engine, data) -> tuple[list[float], float, float, float, float]:
        """(per-step seconds, each step synchronised; memory before; peak memory; mean seconds of as many
        steps run back to back with one synchronisation at the end; seconds of the first warm-up step,
        compilation included). The trainer reads losses on the host every step (a sync); back-to-back
        shows what the GPU does when the host never waits."""
        first = time.perf_counter()
        for i in range(self.warmup):
            engine_step(engine, *data)
            if i == 0:
                sync(self.device)
                first = time.perf_counter() - first
        sync(self.device)
        gc.collect()
        before = self.probe.current()
        self.probe.reset_peak()
        times = []
        for _ in range(self.steps):
            t = time.perf_counter()
            engine_step(engine, *data)
            sync(self.device)
            times.append(time.perf_counter() - t)
        peak = self.probe.peak()
        t = time.perf_counter()
        for _ in range(self.steps):
            engine_step(engine, *data)
        sync(self.device)
        return times, before, peak, (time.perf_counter() - t) / self.steps, first

    def _row(self, micro: int, ckpt: bool, compiled: str | None, timing, counts, extra=None, features: bool = False) -> dict:
        times, before, peak, back_to_back, first = timing
        step = statistics.median(times)
        flops = train_flops(self.cfg.model, self.engine.module.vocab_size, micro, counts["text_len"], counts["n_targets"],
                            tower=not features)
        row = {"micro": micro, "ckpt": ckpt, "compiled": compiled, "status": "ok", "step_s": step,
               "min_s": min(times), "max_s": max(times), "back_to_back_s": back_to_back, "samples_s": micro / step,
               "text_tokens_s": counts["text_tokens"] / step, "seq_tokens_s": micro * counts["seq"] / step,
               "step_flops": flops, "tflops": flops / step / 1e12, "mfu": flops / step / self.peak if self.peak else None,
               "peak_gib": peak / GIB, "transient_gib": (peak - before) / GIB, "resident_gib": before / GIB,
               "memory_method": self.probe.method, "first_step_s": first, "features": features, **(extra or {})}
        self.log(f"  micro {micro:4d} ckpt {'on ' if ckpt else 'off'} {compiled or 'eager'}{' features' if features else ''}: "
                 f"{1e3 * step:8.1f} ms/step, "
                 f"{row['samples_s']:8.1f} samples/s, {row['tflops']:.2f} TFLOP/s"
                 + (f", MFU {100 * row['mfu']:.1f} %" if row["mfu"] is not None else "")
                 + f", peak {row['peak_gib']:.2f} GiB")
        return row

    def _failed(self, micro, ckpt, compiled, status: str) -> dict:
        """Call OUTSIDE the except block: while the exception lives, its traceback's frames still hold
        the failed step's tensors and nothing could be freed."""
        self.log(f"  micro {micro:4d} ckpt {'on ' if ckpt else 'off'} {compiled or 'eager'}: {status}")
        self.drop_engine()  # a ZeRO-2 step cut short leaves half-filled buckets behind
        return {"micro": micro, "ckpt": ckpt, "compiled": compiled, "status": status}

    def _status(self, err: BaseException) -> str:
        if is_oom(err):
            return "OOM"
        self.log(traceback.format_exc(limit=4))
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"

    def _as_configured(self, compiled: str | None) -> str | None:
        """The regions asked for, or (None) what the preset says: model.compile = all, else eager (None)."""
        return compiled or ("all" if self.cfg.model.compile else None)

    def measure(self, micro: int, ckpt: bool, extra: dict | None = None, compiled: str | None = None,
                features: bool = False) -> dict:
        """Median step over `steps` timed steps after `warmup`, checkpointing as given; compiled as the
        preset says (model.compile: all or off), or with the regions named (set_compiled) switched on;
        features=True: on precomputed tower tokens (the tower does not run; its FLOPs are not counted)."""
        compiled = self._as_configured(compiled)
        try:
            engine = self.get_engine()
            engine.module.cfg.activation_checkpointing = ckpt
            set_compiled(engine.module, compiled or "off")
            data, counts = self.batch(micro, features)
            return self._row(micro, ckpt, compiled, self._timed_steps(engine, data), counts, extra, features)
        except Exception as err:  # noqa: BLE001 -- OOM (or any failure) becomes a row; the run goes on
            status = self._status(err)
        finally:
            if self.engine is not None:
                set_compiled(self.engine.module, "off")
        return self._failed(micro, ckpt, compiled, status)

    def sweep(self, micros: list[int], ckpt_both: bool = True) -> list[dict]:
        """Ascending micro-batches, checkpointing on (and off, beside it, while that still fits); stops at
        the first size that does not fit with checkpointing on."""
        rows, off_fits = [], ckpt_both
        for micro in sorted(micros):
            on = self.measure(micro, ckpt=True)
            rows.append(on)
            if on["status"] != "ok":
                break
            if off_fits:
                off = self.measure(micro, ckpt=False)
                rows.append(off)
                off_fits = off["status"] == "ok"
        if self.engine is not None:
            self.engine.module.cfg.activation_checkpointing = True
        return rows

    def sdpa(self, micro: int) -> list[str]:
        data, _ = self.batch(micro)
        return sdpa_backends(self.get_engine().module, data[0], data[1])

    def profile(self, micro: int, ckpt: bool, steps: int = 3, top: int = 15, host: bool = False,
                compiled: str | None = None) -> dict:
        """torch.profiler over `steps` eager steps (after one untimed): the ops with the most self time,
        so a reader sees where a step's time goes. Device kernels by default (on the CPU: CPU ops);
        host=True ranks the host's ops by self CPU time instead and adds the wall and device-busy time
        per step: where the host, not the GPU, sets the pace (small micro-batches)."""
        from torch.profiler import ProfilerActivity, profile

        compiled = self._as_configured(compiled)
        engine = self.get_engine()
        engine.module.cfg.activation_checkpointing = ckpt
        set_compiled(engine.module, compiled or "off")
        data, _ = self.batch(micro)
        engine_step(engine, *data)
        sync(self.device)
        cuda = self.device.type == "cuda"
        if cuda and not host:
            acts = [ProfilerActivity.CUDA]
        else:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                engine_step(engine, *data)
            sync(self.device)
        wall_ms = (time.perf_counter() - t) * 1e3 / steps
        set_compiled(engine.module, "off")
        averages = prof.key_averages()
        dev_key = "self_device_time_total"
        device_busy = sum(getattr(e, dev_key, 0) for e in averages) / 1e3 / steps if cuda else None
        key = dev_key if cuda and not host else "self_cpu_time_total"
        events = sorted((e for e in averages if getattr(e, key, 0) > 0), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)  # microseconds, over `steps` steps
        rows = [{"name": e.key[:90], "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total,
                 "calls_per_step": e.count / steps} for e in events[:top]]
        groups: dict[str, float] = {}
        for e in events if cuda and not host else []:  # device kernels only: host ops' names say little
            group = kernel_group(e.key)
            groups[group] = groups.get(group, 0.0) + getattr(e, key) / 1e3 / steps
        kind = "host ops (self CPU time)" if host or not cuda else "device kernels (self time)"
        self.log(f"  profile micro {micro} ckpt {'on' if ckpt else 'off'}: {kind}, {total / 1e3 / steps:.1f} ms per "
                 f"step (wall {wall_ms:.1f} ms, device busy {device_busy or 0:.1f} ms); top: "
                 + "; ".join(f"{r['name'][:40]} {100 * r['share']:.0f} %" for r in rows[:4]))
        return {"micro": micro, "ckpt": ckpt, "compiled": compiled, "steps": steps, "busy_ms_per_step": total / 1e3 / steps,
                "kind": kind, "wall_ms_per_step": wall_ms, "device_busy_ms_per_step": device_busy, "rows": rows,
                "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}

    def measure_ds_variants(self, micro: int, ckpt: bool, variants: list[tuple[str, dict]]) -> list[dict]:
        """The same step on a fresh engine per (name, change) DeepSpeed variant (top-level sections of the
        config replaced as given)."""
        rows, saved = [], self.ds
        for name, change in variants:
            self.drop_engine()
            self.ds = {**saved, **change}
            self.log(f"  {name}")
            rows.append({**self.measure(micro, ckpt), "variant": name})
        self.ds = saved
        self.drop_engine()
        return rows

    def measure_buckets(self, micro: int, ckpt: bool, buckets: list[int]) -> list[dict]:
        """The same step with zero_optimization.reduce_bucket_size set to each size (a fresh engine each)."""
        zero = self.ds.get("zero_optimization", {})
        variants = [(f"reduce_bucket_size {size:.3g}", {"zero_optimization": {**zero, "reduce_bucket_size": size}})
                    for size in buckets]
        return [{**row, "reduce_bucket_size": size}
                for row, size in zip(self.measure_ds_variants(micro, ckpt, variants), buckets)]
