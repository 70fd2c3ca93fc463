"""The Markdown table of tools/bench_gpu.py (what is printed and appended to docs/BENCHMARKS.md)."""

from __future__ import annotations


def _f(x, fmt: str = ".1f", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _mfu(r: dict) -> str:
    return "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"


def _train_rows(rows: list[dict]) -> list[str]:
    lines = ["| micro | ckpt | compile | step ms: median (min..max) | back-to-back ms/step | samples/s | text tokens/s "
             "| seq tokens/s | TFLOP/s | MFU | peak GiB | transient GiB | ckpt on/off: time, transient memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["micro"], r["ckpt"], r.get("compiled")): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        head = f"| {r['micro']} | {'on' if r['ckpt'] else 'off'} | {r.get('compiled') or 'no'}"
        if r.get("status") != "ok":
            lines.append(f"{head} | {r.get('status')} |  |  |  |  |  |  |  |  |  |")
            continue
        ratio = ""
        off = by_key.get((r["micro"], False, r.get("compiled")))
        if r["ckpt"] and off:
            ratio = (f"{r['step_s'] / off['step_s']:.2f}x, "
                     f"{r['transient_gib'] / off['transient_gib']:.2f}x" if off["transient_gib"] > 0 else "")
        lines.append(f"{head} | {1e3 * r['step_s']:.1f} ({1e3 * r['min_s']:.1f}..{1e3 * r['max_s']:.1f}) "
                     f"| {1e3 * r['back_to_back_s']:.1f} | {r['samples_s']:.1f} | {r['text_tokens_s']:.0f} | {r['seq_tokens_s']:.0f} | {r['tflops']:.2f} "
                     f"| {_mfu(r)} | {r['peak_gib']:.2f} | {r['transient_gib']:.2f} | {ratio} |")
    return lines


def _profile(p: dict) -> list[str]:
    wall = (f"; wall {p['wall_ms_per_step']:.1f} ms per step under the profiler" if p.get("wall_ms_per_step") else ""
            ) + (f", device busy {p['device_busy_ms_per_step']:.1f} ms" if p.get("device_busy_ms_per_step") else "")
    lines = [f"### Where a step goes: torch.profiler, micro {p['micro']}, checkpointing {'on' if p['ckpt'] else 'off'}"
             + (f", compiled: {p['compiled']}" if p.get("compiled") else "")
             + f", {p['steps']} steps ({p['kind']}: {p['busy_ms_per_step']:.1f} ms per step{wall})", ""]
    if p.get("groups"):
        lines += ["By kind (every op or kernel, grouped by name: tools/benchlib/train_bench.py KERNEL_GROUPS): "
                  + "; ".join(f"{g} {ms:.1f} ms" for g, ms in p["groups"].items()), ""]
    lines += ["| op / kernel | ms per step | share | calls per step |", "|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['ms_per_step']:.2f} | {100 * r['share']:.1f} % | {r['calls_per_step']:.0f} |"
              for r in p["rows"]]
    return lines + [""]


def render(results: dict) -> str:
    env = results["env"]
    lines = [f"## One-GPU benchmark: {env['device']}, {env['date']}", "",
             f"Command: `{env['command']}` ({env['wall_s']:.0f} s). torch {env['torch']} (CUDA {env['cuda']}), "
             f"deepspeed {env['deepspeed']}; preset `{env['preset']}` with random weights; {env['ds']} "
             f"{' '.join(env['ds_set'])} (ZeRO-2, bf16), world of {env['world']}; {env['cpus']} CPU cores, "
             f"load average {env['loadavg'][0]:.2f} at start. Peak for MFU: "
             f"{_f(env['peak_flops'] and env['peak_flops'] / 1e12, '.0f')} TFLOP/s dense bf16 (datasheet)"
             + (f"; this card's measured bf16 matmul ({env['matmul']['n']}^3, random data): "
                f"{env['matmul']['tflops']:.0f} TFLOP/s." if env.get("matmul") else "."), ""]
    train = results.get("train", {})
    if "error" in train:
        lines += [f"Training part failed: {train['error']}", ""]
    elif train:
        mem = next((r["memory_method"] for r in train["rows"] if r.get("status") == "ok"), "")
        lines += ["### Training step (engine forward + backward + step, synthetic batch on the device)", "",
                  f"Decoder SDPA kernel: {', '.join(train['sdpa'])}. Memory: {mem}; transient = peak minus "
                  "what was allocated before the timed steps (activations, logits, gradients in flight). "
                  "Text tokens = next-token targets; seq tokens = micro x (image tokens + text positions). Step time: "
                  "each step synchronised (the trainer reads its losses on the host every step); back-to-back: as "
                  "many steps with one synchronisation at the end (no host waits). Samples/s, TFLOP/s, MFU from "
                  "the synchronised median.", ""]
        lines += _train_rows(train["rows"]) + [""]
    prof = results.get("profile", {})
    if "error" in prof:
        lines += [f"Profile part failed: {prof['error']}", ""]
    elif prof:
        for p in (prof, prof.get("host")):
            if p:
                lines += _profile(p)
    comp = results.get("compile", {})
    if "error" in comp:
        lines += [f"Compile part failed: {comp['error']}", ""]
    elif comp:
        lines += [f"### model.compile (regional torch.compile, inductor) at micro-batch {comp['micro']}, one engine", "",
                  "Variants: off = eager; loss = the head loss's chunk kernels compiled; blocks = every decoder "
                  "block's forward compiled; tower = the vision tower as one compiled graph; all = the three "
                  "(model.compile=true). First step: the first warm-up step, "
                  "compilation included (graphs compiled by an earlier row are reused).", "",
                  "| ckpt | compiled | step ms: median (min..max) | / off | back-to-back ms/step | samples/s | TFLOP/s "
                  "| MFU | peak GiB | transient GiB | first step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {r["ckpt"]: r for r in comp["rows"] if r.get("status") == "ok" and r.get("compiled") == "off"
                and not r.get("features")}
        for r in comp["rows"]:
            head = f"| {'on' if r['ckpt'] else 'off'} | {r.get('compiled') or 'off'}"
            head += " on tower features (precompute-features: no tower forward)" if r.get("features") else ""
            if r.get("status") != "ok":
                lines.append(f"{head} | {r.get('status')} |  |  |  |  |  |  |  |  |")
                continue
            ref = base.get(r["ckpt"])
            lines.append(f"{head} | {1e3 * r['step_s']:.1f} ({1e3 * r['min_s']:.1f}..{1e3 * r['max_s']:.1f}) "
                         f"| {_f(ref and r['step_s'] / ref['step_s'], '.3f')} | {1e3 * r['back_to_back_s']:.1f} "
                         f"| {r['samples_s']:.1f} | {r['tflops']:.2f} | {_mfu(r)} | {r['peak_gib']:.2f} "
                         f"| {r['transient_gib']:.2f} | {r['first_step_s']:.1f} |")
        lines.append("")
        if comp.get("profile"):
            lines += _profile(comp["profile"])
    buck = results.get("bucket", {})
    if "error" in buck:
        lines += [f"Bucket part failed: {buck['error']}", ""]
    elif buck:
        lines += [f"### ZeRO-2 reduce bucket: fixed vs the model's trainable size ({buck['trainable'] / 1e6:.1f}M elements)", "",
                  "| reduce_bucket_size | status | step ms (median) | back-to-back ms/step | peak GiB | transient GiB |",
                  "|---|---|---|---|---|---|"]
        for r in buck["rows"]:
            if r.get("status") == "ok":
                lines.append(f"| {r['reduce_bucket_size']:.3g} | ok | {1e3 * r['step_s']:.1f} | {1e3 * r['back_to_back_s']:.1f} "
                             f"| {r['peak_gib']:.2f} | {r['transient_gib']:.2f} |")
            else:
                lines.append(f"| {r['reduce_bucket_size']:.3g} | {r.get('status')} |  |  |  |  |")
        lines.append("")
        if buck.get("overflow_check"):
            lines += ["DeepSpeed bf16 `check_grad_overflow` (per-parameter inf/NaN scan) at the smallest micro-batch, "
                      "a fresh engine each (measured only: the default stays on):", "",
                      "| variant | micro | step ms (median) | back-to-back ms/step |", "|---|---|---|---|"]
            for r in buck["overflow_check"]:
                lines.append(f"| {r['variant']} | {r['micro']} | " + (f"{1e3 * r['step_s']:.1f} | {1e3 * r['back_to_back_s']:.1f} |"
                             if r.get("status") == "ok" else f"{r.get('status')} |  |"))
            lines.append("")
    opt = results.get("optimizer", {})
    if "error" in opt:
        lines += [f"Optimizer part failed: {opt['error']}", ""]
    elif opt.get("skipped"):
        lines += [f"Optimizer part skipped: {opt['skipped']}", ""]
    elif opt:
        lines += ["### The optimizer: torch.optim.AdamW on ZeRO's flat fp32 partitions (DeepSpeed `torch_adam`), a "
                  "fresh engine each", "", "| variant | micro | ckpt | step ms: median (min..max) | back-to-back ms/step | MFU |",
                  "|---|---|---|---|---|---|"]
        for r in opt["rows"]:
            lines.append(f"| {r['variant']} | {r['micro']} | {'on' if r['ckpt'] else 'off'} | "
                         + (f"{1e3 * r['step_s']:.1f} ({1e3 * r['min_s']:.1f}..{1e3 * r['max_s']:.1f}) | "
                            f"{1e3 * r['back_to_back_s']:.1f} | {_mfu(r)} |" if r.get("status") == "ok" else f"{r.get('status')} |  |  |"))
        lines.append("")
    loader = results.get("loader", {})
    if "error" in loader:
        lines += [f"Loader part failed: {loader['error']}", ""]
    elif loader:
        best = max((r["samples_s"] for r in train.get("rows", []) if r.get("status") == "ok"), default=None)
        lines += [f"### Loader: images/s on {loader['photos']} photo-like 640x480 JPEGs ({loader['mean_kib']:.0f} KiB "
                  f"mean), {loader['cpus']} CPU cores", "",
                  "| shards | workers | micro | images/s (epoch, start-up included) | steady images/s | first batch s "
                  "| steady / GPU samples/s at the best micro |", "|---|---|---|---|---|---|---|"]
        for r in loader["rows"]:
            ratio = f"{r['steady_images_s'] / best:.2f}" if best and r["steady_images_s"] else "n/a"
            lines.append(f"| {r.get('shards', '640x480 JPEGs as they are')} | {r['workers']} | {r['micro']} | {r['images_s']:.0f} | {_f(r['steady_images_s'], '.0f')} "
                         f"| {r['first_batch_s']:.2f} | {ratio} |")
        if loader.get("precompute"):
            pre = loader["precompute"]
            lines.append(f"precompute-features over the resized shards: {pre['images_s']:.0f} images/s ({pre['dtype']} "
                         f"on {pre['device']}), {pre['kib_per_sample']:.1f} KiB per sample")
        lines.append("")
    dec = results.get("decode", {})
    if "error" in dec:
        lines += [f"Decode part failed: {dec['error']}", ""]
    elif dec:
        what = (f"the trained export `{dec['model']}` on rendered demo scenes: its heads' own acceptance" if dec.get("model")
                else "random weights: how many draft tokens are accepted depends on what the random model happens to "
                     "predict (it often repeats one token), so read this as the decoding machinery's cost at the preset's "
                     "width, not a trained model's speed-up")
        lines += [f"### Decoding ({dec['dtype']}, n_future={dec['n_future']}, {what})", "",
                  "Static: fixed-shape steps replayed as CUDA graphs (vlm_dist/infer/static.py): the first decode of "
                  "a batch size captures them (its tokens/s in brackets), later ones replay them.", "",
                  "| batch | new tokens/row | greedy tokens/s | speculative tokens/s | spec / greedy "
                  "| tokens per spec call | rows identical | static greedy tokens/s (first) | static spec tokens/s (first) "
                  "| static spec / greedy | static rows identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec["rows"]:
            lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['greedy_tokens_s']:.0f} | {r['speculative_tokens_s']:.0f} "
                         f"| {r['speculative_tokens_s'] / r['greedy_tokens_s']:.2f} | {r['tokens_per_call']:.2f} "
                         f"| {r['identical_rows']}/{r['batch']} | {r['greedy_static_tokens_s']:.0f} "
                         f"({r['greedy_static_first_tokens_s']:.0f}) | {r['speculative_static_tokens_s']:.0f} "
                         f"({r['speculative_static_first_tokens_s']:.0f}) "
                         f"| {r['speculative_static_tokens_s'] / r['greedy_tokens_s']:.2f} "
                         f"| {r['static_identical_rows']}/{r['batch']} |")
        lines.append("")
        if dec.get("profile"):
            lines += ["Host work per emitted token, batch 1 (torch.profiler; launches and syncs are CUDA runtime "
                      "calls, 0 on the CPU):", "",
                      "| decoder | ms per token (profiled) | aten ops | kernel launches | device syncs | top host ops (self CPU us per token) |",
                      "|---|---|---|---|---|---|"]
            for name, p in dec["profile"].items():
                tops = "; ".join(f"`{t['name']}` {t['self_cpu_us_per_token']:.0f}" for t in p["top"][:4])
                lines.append(f"| {name} | {p['ms_per_token']:.2f} | {p['aten_ops_per_token']:.0f} | "
                             f"{p['launches_per_token']:.0f} | {p['syncs_per_token']:.1f} | {tops} |")
            lines.append("")
    secs = results.get("seconds", {})
    lines.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    return "\n".join(lines) + "\n"
