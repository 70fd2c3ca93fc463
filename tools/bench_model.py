"""Benchmark the model's training step: SDPA vs explicit attention, and activation checkpointing on vs off.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py                    # default run (~5 min, 2 CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py --quick            # smoke run (demo preset only)
    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_model.py --json bench.json  # also write the raw numbers

A training step is forward + backward + torch.optim.AdamW step (lr 1e-4) on one fixed synthetic batch:
random images (B, 3, S, S) with S = the vision tower's image size, and captions of random length
(8 .. data.max_text_len tokens: <sot>, random BPE ids, <eot>, pad) turned into inputs (B, max_text_len-1)
and per-head targets with `make_targets`, so padding and IGNORE_INDEX positions look like real data.
The decoder sequence is image tokens + max_text_len - 1 text tokens (demo: 16 + 31 = 47, base: 49 + 31 = 80).

1. Attention kernel. Three models are built from the preset with the same weights, each with its own
   AdamW: as the preset trains (SDPA, the preset's checkpointing setting), the same with
   model.attention=explicit, and the same with activation checkpointing flipped. After one untimed
   warm-up step each they are stepped in turn (A B C A B C ...) on the same batch, so drift in the
   machine's load hits all alike. Reported: median step time (min..max) of each, and the ratios
   explicit/SDPA and checkpointing on/off, of the medians and of the minima (> 1: SDPA resp. no
   checkpointing is faster).

2. Activation checkpointing, memory. Each setting (off, on) runs in a fresh subprocess, before the
   parent builds any model, so one run's allocator state cannot hide the other's peak; glibc's mmap
   threshold is pinned there (MALLOC_MMAP_THRESHOLD_=65536) so every buffer above 64 KiB is its own
   mmap and goes back to the OS when freed: the resident set size (RSS) then follows live memory.
   Read from /proc/self/status (VmRSS; VmHWM = peak RSS, reset with `echo 5 > /proc/self/clear_refs`):
     - step-1 peak: peak RSS during the first step minus RSS just before it; includes the gradients
       and AdamW state that the first step allocates, plus activations;
     - fwd+bwd peak: in later steps (gradients kept, zero_grad(set_to_none=False)), peak RSS during
       forward + backward minus RSS before it: activations saved for backward, the logits and their
       gradient, and temporaries. This is what activation checkpointing is meant to shrink;
     - AdamW step peak: the same around optimizer.step() alone (per-parameter temporaries).
   On a GPU the same numbers come from torch.cuda.memory_allocated / max_memory_allocated
   (reset_peak_memory_stats at the same points), and times use torch.cuda.synchronize.

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
from vlm_dist.observe.flops import proc_status_kib  # noqa: E402
from vlm_dist.text import IGNORE_INDEX, get_tokenizer, make_targets  # noqa: E402

# The base preset names the 'openai' pretrained tag, which needs the hub: benchmarks use random weights
# (same shapes, same freezing as the preset says).
PRESET_OVERRIDES = {"base": ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"]}
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


# --- interleaved timing: reference, explicit attention, flipped checkpointing ----------------------

def variants(preset: str) -> dict[str, list[str]]:
    """The three models timed side by side: the preset as it trains (SDPA, its own checkpointing
    setting), the same with explicit attention, and the same with checkpointing flipped."""
    ckpt = load_config(preset, PRESET_OVERRIDES.get(preset, [])).model.activation_checkpointing
    flag = lambda on: f"model.activation_checkpointing={str(on).lower()}"  # noqa: E731
    return {
        "sdpa": ["model.attention=sdpa", flag(ckpt)],
        "explicit": ["model.attention=explicit", flag(ckpt)],
        "sdpa, ckpt flipped": ["model.attention=sdpa", flag(not ckpt)],
    }


def bench_group(preset: str, batch: int, repeats: int, device: torch.device) -> dict:
    """Models differing only in the overrides of `variants`, with the same weights and one AdamW each,
    stepped in turn (A B C A B C ...) on one batch after an untimed warm-up step each, so drift in the
    machine's load hits every variant alike."""
    models = {}
    for name, overrides in variants(preset).items():
        cfg, model, opt = build(preset, overrides, device)
        models[name] = (cfg, model, opt)
    ref_cfg, ref, _ = models["sdpa"]
    for _, model, _ in models.values():
        model.load_state_dict(ref.state_dict())  # identical weights (equal by seed already; made sure)
    data = make_batch(ref_cfg, batch, ref.vocab_size, device)
    for _, model, opt in models.values():  # warm-up: allocates grads and AdamW state, warms kernels
        train_step(model, opt, data, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (_, model, opt) in models.items():
            times[name].append(train_step(model, opt, data, device))
    total, trainable = param_counts(ref)
    return {
        "preset": preset, "batch": batch, "repeats": repeats,
        "seq_len": ref_cfg.model.n_image_tokens + ref_cfg.data.max_text_len - 1,
        "image_tokens": ref_cfg.model.n_image_tokens, "params": total, "trainable": trainable,
        "preset_checkpointing": ref_cfg.model.activation_checkpointing,
        "variants": {name: {"overrides": variants(preset)[name], **summary(t)} for name, t in times.items()},
    }


# --- 2. activation checkpointing (one fresh process per setting) ----------------------------------

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
        return int(1024 * (proc_status_kib("VmRSS") or 0))

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = proc_status_kib("VmHWM")
        if hwm is None:  # no /proc: getrusage is the lifetime peak (kB on Linux)
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(1024 * hwm)

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
    fwd_bwd, adamw = [], []  # steady state: grads kept (set_to_none=False), only transients come and go
    for _ in range(spec["steps"]):
        opt.zero_grad(set_to_none=False)
        base = probe.current()
        ok = probe.reset_peak()
        model(*data)["loss"].backward()
        sync(device)
        fwd_bwd.append(probe.peak() - base if ok else None)
        base = probe.current()
        probe.reset_peak()
        opt.step()
        sync(device)
        adamw.append(probe.peak() - base if ok else None)
    fwd_bwd_peak = None if None in fwd_bwd else max(fwd_bwd) / MIB
    opt_peak = None if None in adamw else max(adamw) / MIB
    return {
        **spec, "memory_method": probe.method, "threads": torch.get_num_threads(),
        "resident_before_mib": before / MIB, "resident_after_first_mib": resident / MIB,
        "first_step_peak_mib": first_peak / MIB, "fwd_bwd_peak_mib": fwd_bwd_peak, "adamw_peak_mib": opt_peak,
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


def bench_preset(preset: str, batch: int, repeats: int, memory_steps: int, device: torch.device) -> dict:
    """Memory first (fresh processes, before this process holds big models), then the timing group."""
    memory = {ckpt: memory_run(preset, batch, ckpt, memory_steps, device) for ckpt in (False, True)}
    timing = bench_group(preset, batch, repeats, device)
    return {"timing": timing, "memory_off": memory[False], "memory_on": memory[True]}


# --- report ---------------------------------------------------------------------------------------

def _spread(r: dict) -> str:
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}..{r['max_s']:.3f})"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _shape(r: dict) -> str:
    return f"{r['seq_len']} ({r['image_tokens']}+{r['seq_len'] - r['image_tokens']})"


def _ratio(num: dict, den: dict) -> str:
    return f"{num['median_s'] / den['median_s']:.3f} / {num['min_s'] / den['min_s']:.3f}"


def render(env: dict, results: list[dict]) -> str:
    lines = [f"torch {env['torch']}, {env['threads']} threads, device: {env['device_name']}", "",
             "### Attention kernel: training step (forward + backward + AdamW), seconds, interleaved", "",
             "| preset | batch | seq (img+text) | params (trainable) | ckpt | steps each | SDPA: median (min..max) "
             "| explicit: median (min..max) | explicit / SDPA: medians / mins |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in (x["timing"] for x in results):
        v = r["variants"]
        lines.append(
            f"| {r['preset']} | {r['batch']} | {_shape(r)} | {_m(r['params'])} ({_m(r['trainable'])}) "
            f"| {'on' if r['preset_checkpointing'] else 'off'} | {r['repeats']} | {_spread(v['sdpa'])} "
            f"| {_spread(v['explicit'])} | {_ratio(v['explicit'], v['sdpa'])} |"
        )
    method = results[0]["memory_off"]["memory_method"] if results else ""
    lines += ["", "### Activation checkpointing: step time (seconds, interleaved with the table above, SDPA) and "
              f"memory ({method}, one fresh process per row, MiB)", "",
              "| preset | batch | ckpt | step: median (min..max) | time on/off: medians / mins "
              "| resident before step 1 | step-1 peak (+grads +AdamW state) | fwd+bwd peak (activations, logits) "
              "| fwd+bwd peak on/off | AdamW step peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in results:
        r, v = x["timing"], x["timing"]["variants"]
        on, off = (v["sdpa"], v["sdpa, ckpt flipped"]) if r["preset_checkpointing"] else (v["sdpa, ckpt flipped"], v["sdpa"])
        m_off, m_on = x["memory_off"], x["memory_on"]
        for label, t, mem in (("off", off, m_off), ("on", on, m_on)):
            peak = "n/a" if mem["fwd_bwd_peak_mib"] is None else f"{mem['fwd_bwd_peak_mib']:.0f}"
            opt_peak = "n/a" if mem["adamw_peak_mib"] is None else f"{mem['adamw_peak_mib']:.0f}"
            time_ratio = peak_ratio = ""
            if label == "on":
                time_ratio = _ratio(on, off)
                if m_on["fwd_bwd_peak_mib"] and m_off["fwd_bwd_peak_mib"]:
                    peak_ratio = f"{m_on['fwd_bwd_peak_mib'] / m_off['fwd_bwd_peak_mib']:.2f}"
            lines.append(
                f"| {r['preset']} | {r['batch']} | {label} | {_spread(t)} | {time_ratio} "
                f"| {mem['resident_before_mib']:.0f} | {mem['first_step_peak_mib']:.0f} | {peak} | {peak_ratio} | {opt_peak} |"
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
    p.add_argument("--runs", default="demo:32,base:2",
                   help="PRESET:BATCH list; each gets both comparisons. Default: %(default)s")
    p.add_argument("--repeats", type=int, default=9, help="Timed steps per variant (interleaved). Default: %(default)s")
    p.add_argument("--base-repeats", type=int, default=3,
                   help="--repeats for the base preset (seconds per step on a CPU). Default: %(default)s")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="Steady-state steps after step 1 in each memory run. Default: %(default)s")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu.")
    p.add_argument("--quick", action="store_true", help="Smoke run: demo batch 8, 2 repeats, 1 memory step.")
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
        args.runs, args.repeats, args.memory_steps = "demo:8", 2, 1
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores), no GPU used",
        "python": platform.python_version(),
        "command": " ".join(["tools/bench_model.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"torch {env['torch']} | threads {env['threads']} | device {env['device_name']}", file=sys.stderr)
    t0 = time.perf_counter()
    results = []
    for preset, batch in parse_runs(args.runs):
        repeats = args.base_repeats if preset == "base" and not args.quick else args.repeats
        print(f"[{time.perf_counter() - t0:4.0f}s] {preset} batch {batch}: 2 memory processes, then "
              f"{repeats} interleaved steps x 3 variants", file=sys.stderr)
        results.append(bench_preset(preset, batch, repeats, args.memory_steps, device))
    env["wall_s"] = time.perf_counter() - t0
    print(f"[{env['wall_s']:4.0f}s] done", file=sys.stderr)
    print(render(env, results))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    return {"env": env, "results": results}


if __name__ == "__main__":
    main()
