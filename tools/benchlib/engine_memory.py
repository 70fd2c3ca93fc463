"""ZeRO-2 memory per rank for tools/bench_engine.py (--parts memory); memory_worker runs inside each rank.

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

import json
import os
import subprocess
import sys
from pathlib import Path

from benchlib.engine_common import MIB, REPO, build_model, ds_config

SCRIPT = REPO / "tools" / "bench_engine.py"  # started once per rank with --worker


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
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--worker", json.dumps(spec)], env=env, cwd=REPO,
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

