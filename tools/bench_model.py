"""Benchmark the model's training step: SDPA vs explicit attention, and activation checkpointing on vs off.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py                    # default run (~5 min, 2 CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py --quick            # smoke run (demo preset only)
    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py --json bench.json  # also write the raw numbers

A training step is forward + backward + torch.optim.AdamW step (lr 1e-4) on one fixed synthetic batch:
random images (B, 3, S, S) with S = the vision tower's image size, and captions of random length
(8 .. data.max_text_len tokens: <sot>, random BPE ids, <eot>, pad) turned into inputs (B, max_text_len-1)
and per-head targets with `make_targets`, so padding and IGNORE_INDEX positions look like real data.
The decoder sequence is image tokens + max_text_len - 1 text tokens (demo: 16 + 31 = 47, base: 49 + 31 = 80).

1. Attention kernel. Two models built from the same preset and the same weights, one with
   model.attention=sdpa and one with model.attention=explicit, each with its own AdamW, are stepped
   on the same batch alternately (A B A B ...) after one untimed warm-up step each, so drift in machine
   load hits both alike. Reported: median step time of each (min..max) and explicit/SDPA, the ratio of
   the medians (> 1 means SDPA is faster).

2. Activation checkpointing. Each setting runs in a fresh subprocess (so one run's allocator state
   cannot hide the other's peak) with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536):
   every tensor above 64 KiB is its own mmap and goes back to the OS when freed, so the resident set
   size (RSS) follows live tensor memory. Two numbers, both read from /proc/self/status:
     - first-step peak: VmHWM (peak RSS) during the first step minus VmRSS just before it; includes
       the gradients and the AdamW state that the first step allocates, plus activations;
     - step peak: after the first step, VmHWM is reset (`echo 5 > /proc/self/clear_refs`), then the
       timed steps run (grads kept, zero_grad(set_to_none=False)); peak minus the RSS at the reset is
       the transient memory of a steady-state step: activations saved for backward + temporaries.
       This is the number activation checkpointing is meant to shrink.
   On a GPU the same two numbers come from torch.cuda.max_memory_allocated (reset_peak_memory_stats
   at the same points), and times from torch.cuda.synchronize around each step.

Timings on a shared 2-core machine are noisy: read the min..max spread next to each median.
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be downloaded here; fail fast instead of hanging

import torch  # noqa: E402

from vlm_dist.config import load_config  # noqa: E402
from vlm_dist.text import IGNORE_INDEX, get_tokenizer, make_targets  # noqa: E402

# The base preset names the 'openai' pretrained tag, which needs the hub: benchmarks use random weights
# (same shapes, same freezing as the preset says).
PRESET_OVERRIDES = {"base": ["model.vision.pretrained=null"]}
MIB = 2**20


# --- batch, model, step ---------------------------------------------------------------------------

def make_batch(cfg, batch: int, vocab_size: int, device: torch.device, seed: int = 0):
    """Synthetic (images (B,3,S,S), inputs (B,L-1), targets (B,n_future,L-1)) with realistic padding."""
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer()
    S, L = cfg.model.vision.geometry["image_size"], cfg.data.max_text_len
    images = torch.randn(batch, 3, S, S, generator=g)
    tokens = torch.zeros(batch, L, dtype=torch.long)  # pad id 0
    mask = torch.zeros(batch, L, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(min(8, L), L + 1, (1,), generator=g))  # caption length incl. <sot>, <eot>
        tokens[b, 1 : n - 1] = torch.randint(1, vocab_size, (n - 2,), generator=g)
        tokens[b, 0], tokens[b, n - 1] = tok.bos_id, tok.eos_id
        mask[b, 1:n] = True  # caption tokens and <eot> are targets
    inputs, targets = make_targets(tokens, mask, cfg.model.n_future)
    assert (targets != IGNORE_INDEX).any()
    return images.to(device), inputs.to(device), targets.to(device)


def build(preset: str, extra: list[str], device: torch.device, seed: int = 0):
    """Model (train mode) + AdamW over its trainable parameters, from a preset and overrides."""
    from vlm_dist.model.vlm import VLM  # imported late: the parent process of the memory runs never builds one

    cfg = load_config(preset, PRESET_OVERRIDES.get(preset, []) + extra)
    torch.manual_seed(seed)
    model = VLM(cfg.model).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return cfg, model, opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, batch, device: torch.device, set_to_none: bool = True) -> float:
    """One forward + backward + AdamW step; wall seconds (device-synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=set_to_none)
    model(*batch)["loss"].backward()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def param_counts(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --- interleaved A/B timing (attention kernel, checkpointing step time) ---------------------------

def bench_pair(preset: str, batch: int, repeats: int, device: torch.device, key: str, values: tuple) -> dict:
    """Two models from one preset differing only in `key` (A = values[0], B = values[1]), same weights,
    own AdamW each, stepped A B A B ... on one batch after an untimed warm-up step each."""
    (a, b), models = values, {}
    for value in values:
        cfg, model, opt = build(preset, [f"{key}={value}"], device)
        models[value] = (model, opt)
    models[b][0].load_state_dict(models[a][0].state_dict())  # identical weights (equal by seed already)
    data = make_batch(cfg, batch, models[a][0].vocab_size, device)
    for model, opt in models.values():  # warm-up: allocates grads and AdamW state, warms kernels
        train_step(model, opt, data, device)
    times: dict = {a: [], b: []}
    for _ in range(repeats):
        for value, (model, opt) in models.items():
            times[value].append(train_step(model, opt, data, device))
    total, trainable = param_counts(models[a][0])
    return {
        "preset": preset, "batch": batch, "key": key, "a": str(a), "b": str(b), "repeats": repeats,
        "seq_len": cfg.model.n_image_tokens + cfg.data.max_text_len - 1, "image_tokens": cfg.model.n_image_tokens,
        "params": total, "trainable": trainable, "checkpointing": cfg.model.activation_checkpointing,
        "attention": cfg.model.attention, "A": summary(times[a]), "B": summary(times[b]),
        "b_over_a": statistics.median(times[b]) / statistics.median(times[a]),
    }


# --- 2. activation checkpointing (one fresh process per setting) ----------------------------------

def _proc_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class MemoryProbe:
    """current() / peak() in bytes, and reset_peak(): CUDA allocator stats on a GPU, RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "RSS (/proc/self/status)"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return 1024 * (_proc_kib("VmRSS") or 0)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _proc_kib("VmHWM")
        if hwm is None:  # no /proc: getrusage is the lifetime peak (kB on Linux)
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 1024 * hwm

    def reset_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return _reset_peak_rss()


def memory_worker(spec: dict) -> dict:
    """Runs inside the fresh subprocess: build, measure the first step, then the steady-state steps."""
    device = torch.device(spec["device"])
    cfg, model, opt = build(spec["preset"], [f"model.activation_checkpointing={spec['checkpointing']}"], device)
    data = make_batch(cfg, spec["batch"], model.vocab_size, device)
    probe = MemoryProbe(device)
    probe.reset_peak()
    before = probe.current()  # runtime + weights + batch; no grads, no optimizer state yet
    train_step(model, opt, data, device)
    first_peak = probe.peak() - before
    resident = probe.current()  # + grads + AdamW state
    can_reset = probe.reset_peak()
    for _ in range(spec["steps"]):
        train_step(model, opt, data, device, set_to_none=False)  # keep grads: only transients come and go
    step_peak = probe.peak() - resident if can_reset else None
    return {
        **spec, "memory_method": probe.method, "threads": torch.get_num_threads(),
        "resident_before_mib": before / MIB, "resident_after_first_mib": resident / MIB,
        "first_step_peak_mib": first_peak / MIB, "step_peak_mib": None if step_peak is None else step_peak / MIB,
    }


def memory_run(preset: str, batch: int, checkpointing: bool, steps: int, device: torch.device) -> dict:
    """memory_worker in a fresh interpreter, with glibc's mmap threshold pinned (see the docstring)."""
    spec = {"preset": preset, "batch": batch, "steps": steps, "checkpointing": checkpointing, "device": str(device)}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_checkpointing(preset: str, batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    timing = bench_pair(preset, batch, repeats, device, "model.activation_checkpointing", (False, True))
    memory = [memory_run(preset, batch, ckpt, steps, device) for ckpt in (False, True)]
    return {"timing": timing, "memory": memory}


# --- report ---------------------------------------------------------------------------------------

def _spread(r: dict) -> str:
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}..{r['max_s']:.3f})"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _shape(r: dict) -> str:
    return f"{r['seq_len']} ({r['image_tokens']}+{r['seq_len'] - r['image_tokens']})"


def render(env: dict, attention: list[dict], checkpointing: list[dict]) -> str:
    lines = [f"torch {env['torch']}, {env['threads']} threads, device: {env['device_name']}", ""]
    if attention:
        lines += [
            "### Attention kernel: training step (forward + backward + AdamW), interleaved A/B, seconds",
            "",
            "| preset | batch | seq (img+text) | params (trainable) | ckpt | steps | SDPA: median (min..max) "
            "| explicit: median (min..max) | explicit / SDPA |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in attention:
            lines.append(
                f"| {r['preset']} | {r['batch']} | {_shape(r)} | {_m(r['params'])} ({_m(r['trainable'])}) "
                f"| {'on' if r['checkpointing'] else 'off'} | {r['repeats']}+{r['repeats']} | {_spread(r['A'])} "
                f"| {_spread(r['B'])} | {r['b_over_a']:.3f} |"
            )
        lines.append("")
    if checkpointing:
        method = checkpointing[0]["memory"][0]["memory_method"]
        lines += [
            "### Activation checkpointing: step time (interleaved A/B, seconds) and memory "
            f"({method}, fresh process per row)",
            "",
            "| preset | batch | seq | ckpt | attention | step: median (min..max) | time on/off | steps "
            "| resident before step 1, MiB | first-step peak, MiB (+grads +AdamW) | steady step peak, MiB (activations) "
            "| peak on/off |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in checkpointing:
            t, (m_off, m_on) = c["timing"], c["memory"]
            for label, times, mem in (("off", t["A"], m_off), ("on", t["B"], m_on)):
                peak = "n/a" if mem["step_peak_mib"] is None else f"{mem['step_peak_mib']:.0f}"
                ratio_t = f"{t['b_over_a']:.3f}" if label == "on" else ""
                ratio_m = (f"{m_on['step_peak_mib'] / m_off['step_peak_mib']:.2f}"
                           if label == "on" and m_on["step_peak_mib"] and m_off["step_peak_mib"] else "")
                lines.append(
                    f"| {t['preset']} | {t['batch']} | {_shape(t)} | {label} | {t['attention']} | {_spread(times)} "
                    f"| {ratio_t} | {t['repeats']}+{t['repeats']} | {mem['resident_before_mib']:.0f} "
                    f"| {mem['first_step_peak_mib']:.0f} | {peak} | {ratio_m} |"
                )
        lines.append("")
    return "\n".join(lines)


def parse_runs(text: str) -> list[tuple[str, int]]:
    """'demo:32,base:2' -> [('demo', 32), ('base', 2)]; '' -> []."""
    runs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        preset, _, batch = item.partition(":")
        runs.append((preset, int(batch)))
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Method: see the module docstring of tools/bench_model.py.")
    p.add_argument("--attention", default="demo:32,base:2",
                   help="PRESET:BATCH list for the SDPA-vs-explicit comparison ('' to skip). Default: %(default)s")
    p.add_argument("--checkpointing", default="demo:32,base:2",
                   help="PRESET:BATCH list for the checkpointing off/on comparison ('' to skip). Default: %(default)s")
    p.add_argument("--repeats", type=int, default=7, help="Timed steps per setting per A/B comparison (interleaved).")
    p.add_argument("--base-repeats", type=int, default=4, help="--repeats for the base preset (slow on CPU).")
    p.add_argument("--memory-steps", type=int, default=2, help="Steady-state steps after step 1 in each memory run.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu.")
    p.add_argument("--quick", action="store_true", help="Smoke run: demo preset only, batch 8, 2 repeats.")
    p.add_argument("--json", type=Path, help="Also write the raw results (every step time) to this file.")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one memory run in a fresh process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.quick:
        args.attention, args.checkpointing, args.repeats, args.memory_steps = "demo:8", "demo:8", 2, 1
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores), no GPU used",
        "python": platform.python_version(),
        "command": " ".join(["tools/bench_model.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"torch {env['torch']} | threads {env['threads']} | device {env['device_name']}", file=sys.stderr)
    t0 = time.perf_counter()
    attention, checkpointing = [], []
    for preset, batch in parse_runs(args.attention):
        repeats = args.base_repeats if preset == "base" and not args.quick else args.repeats
        print(f"[{time.perf_counter() - t0:5.0f}s] attention: {preset} batch {batch}, {repeats}+{repeats} steps",
              file=sys.stderr)
        attention.append(bench_pair(preset, batch, repeats, device, "model.attention", ("sdpa", "explicit")))
    for preset, batch in parse_runs(args.checkpointing):
        repeats = args.base_repeats if preset == "base" and not args.quick else args.repeats
        print(f"[{time.perf_counter() - t0:5.0f}s] checkpointing: {preset} batch {batch}, {repeats}+{repeats} steps "
              f"+ 2 memory processes", file=sys.stderr)
        checkpointing.append(bench_checkpointing(preset, batch, repeats, args.memory_steps, device))
    env["wall_s"] = time.perf_counter() - t0
    print(f"[{env['wall_s']:5.0f}s] done", file=sys.stderr)
    print(render(env, attention, checkpointing))
    result = {"env": env, "attention": attention, "checkpointing": checkpointing}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
