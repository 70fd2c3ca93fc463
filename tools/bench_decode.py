"""Decoding speed on CPU: KV-cached greedy vs self-speculative decoding (and cached vs uncached greedy).

    python tools/bench_decode.py --model runs/quick4 --scenes 32             # trained model, demo scenes
    python tools/bench_decode.py --model runs/demo/export --shards data/demo/shards/val
    python tools/bench_decode.py --model runs/quick4 --scenes 32 --base      # + the base-width projection
    python tools/bench_decode.py --cache-table                               # cached vs uncached greedy
    python tools/bench_decode.py --model runs/demo/export --profile          # where a step's / a call's time goes
    python tools/bench_decode.py --model runs/quick4 --dtype bf16 --packing both --base   # bf16, packed weights vs F.linear
    python tools/bench_decode.py --model runs/quick4 --sampling 0.7                       # plain vs speculative sampling

1. Trained model (--model, an export folder), per thread count (--threads) and batch size (--batches):
   greedy as before issue 9 (lm_head logits then argmax), greedy (`generate`, temperature 0: one
   W @ X^T matmul + argmax, VLM.greedy_ids) and speculative (`speculative_generate_batch`) decode the same
   validation images (captions, --new-tokens at most), alternately, --repeats times; medians. Reported:
   tokens/s of each (emitted tokens: the end token is not counted), the speed-up, tokens per model call
   per row, acceptance per draft position, and whether the three outputs are identical token for token.
   The speed-up is speculative over greedy (this code), the harder comparison.
2. --base: the `base` decoder (24 x 768, n_future 4; the 32 px tiny vision tower instead of ViT-B-32,
   which only the prefill sees) with random weights, whose acceptance says nothing of a trained model's, so
   what is measured is the price of each part: the prefill of greedy and of speculative decoding (which
   also runs the heads), a greedy step and a verify call (each later model call with its share of the
   decoding loop). The projected speed-up puts the trained model's batches of part 1 (their greedy steps
   and verify calls per batch) at this width: (greedy prefill + steps x step) / (speculative prefill +
   calls x call); the same projection at the demo width is printed beside its measured speed-up as a check.
   (Rounds 1-9 projected tokens-per-call x step / call, with the prefill spread over each decode's own
   calls: a random model that happened to accept several tokens per call spread it over few calls.)
   --dtype bf16 runs both parts in bf16; on a CPU, --packing both puts the decoders' linears through weights
   packed once for oneDNN (vlm_dist/model/packed.py) and through F.linear side by side.
3. --cache-table: cached vs uncached greedy with random demo-architecture weights (every row decodes
   the full --new-tokens, so tokens/s compare like with like).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, cpu: list | None = None) -> float:
    """Wall seconds of fn(); its process CPU seconds appended to `cpu` (at 1 thread, CPU time is what
    the run itself used, less disturbed than wall time when other processes share the cores)."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


def load_images(model, shards: str | None, scenes: int) -> torch.Tensor:
    """Validation images: from shards, or `scenes` demo scenes rendered in memory (seed 12345, unseen in training)."""
    if shards:
        from vlm_dist.data.samples import ImageToTensor
        from vlm_dist.infer.evaluate import iter_shard_samples

        to_tensor = ImageToTensor(model.cfg.vision.geometry["image_size"])
        return torch.stack([x if isinstance(x, torch.Tensor) else to_tensor(x)  # feature shards: tower tokens
                            for _, x, _ in iter_shard_samples(shards, scenes)])
    from train_quick import demo_samples  # tools/ is on sys.path when this file runs as a script

    return torch.stack([im for im, _, _ in demo_samples(scenes, seed=12345, side=model.cfg.vision.geometry["image_size"])])


@torch.no_grad()
def legacy_greedy(model, images: torch.Tensor, prompt: list[int], new_tokens: int) -> list[list[int]]:
    """Greedy decoding as `generate` did it before issue 9 (same prompt for every row): each step
    unembeds the (B, V) logits with lm_head, then takes their argmax."""
    from vlm_dist.text import get_tokenizer

    eos, B = get_tokenizer().eos_id, images.shape[0]
    cache = model.new_cache(B)
    logits = model.step(torch.tensor([prompt] * B), cache, images=images, next_token_only=True)[:, 0, -1]
    seq, done = [], torch.zeros(B, dtype=torch.bool)
    for i in range(new_tokens):
        nxt = logits.argmax(dim=-1)
        seq.append(nxt)
        done |= nxt == eos
        if done.all() or i == new_tokens - 1:
            break
        logits = model.step(nxt[:, None], cache, next_token_only=True)[:, 0, -1]
    rows = torch.stack(seq, 1).tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def compare(model, images: torch.Tensor, B: int, new_tokens: int, repeats: int) -> dict:
    """Greedy vs speculative over all images in batches of B; medians of alternating repeats."""
    from vlm_dist.infer.generate import generate
    from vlm_dist.infer.speculative import merge_stats, speculative_generate_batch
    from vlm_dist.text import get_tokenizer, prompt_tokens

    prompt = prompt_tokens(get_tokenizer())
    batches = [images[i : i + B] for i in range(0, len(images), B)]
    g_t, s_t, l_t, g_c, s_c = [], [], [], [], []
    table = model.argmax_table()
    rows0, fallback0 = table.rows, table.fallback_rows
    for _ in range(repeats):
        greedy, spec, legacy = [], [], []
        l_t.append(timed(lambda: [legacy.extend(legacy_greedy(model, b, prompt, new_tokens)) for b in batches]))
        g_t.append(timed(lambda: [greedy.extend(generate(model, b, [prompt] * len(b), new_tokens)) for b in batches], g_c))
        s_t.append(timed(lambda: [spec.append(speculative_generate_batch(model, b, [prompt] * len(b), new_tokens))
                                  for b in batches], s_c))
    rows = [r for out, _ in spec for r in out]
    stats = merge_stats([s for _, s in spec])
    tokens = sum(map(len, greedy))
    # a batch's greedy steps after its prefill: its longest row's (the prefill gives a row's first token, a
    # step each later one and the end token), for the base-width projection
    # (a row cut at new_tokens took new_tokens - 1 steps: no step gave it an end token)
    steps = statistics.mean(max(min(len(r), new_tokens - 1) for r in greedy[i : i + B]) for i in range(0, len(greedy), B))
    return {"batch": B, "tokens": tokens, "identical": rows == greedy == legacy, "rows": rows,
            "greedy_steps_per_batch": steps, "spec_calls_per_batch": stats["calls"] / len(batches),
            "legacy_tps": tokens / statistics.median(l_t), "greedy_tps": tokens / statistics.median(g_t),
            "spec_tps": stats["tokens"] / statistics.median(s_t), "speedup": statistics.median(g_t) / statistics.median(s_t),
            "tokens_per_call": stats["tokens_per_call"], "accepted": stats["accepted_per_position"],
            "cpu_speedup": statistics.median(g_c) / statistics.median(s_c),
            "fallback": (table.fallback_rows - fallback0) / max(table.rows - rows0, 1)}


def call_costs(model, B: int, new_tokens: int, repeats: int) -> dict:
    """Greedy and speculative decodes of random images (random weights): seconds of each one's prefill (the
    model call that is given the images, timed by a hook on the instance) and of each later greedy step /
    verify call (the rest of the decode, loop included, over their count); medians over repeats."""
    from vlm_dist.infer.generate import generate
    from vlm_dist.infer.speculative import speculative_generate_batch
    from vlm_dist.text import get_tokenizer, prompt_tokens

    size = model.cfg.vision.geometry["image_size"]
    images = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [prompt_tokens(get_tokenizer())] * B
    calls: dict[str, list[float]] = {}

    def hook(name: str, fn):
        def timed_call(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            calls.setdefault(name + (" prefill" if kwargs.get("images") is not None else ""), []).append(time.perf_counter() - t)
            return out
        return timed_call

    parts: dict[str, list[float]] = {}
    generate(model, images, prompts, new_tokens)  # untimed: the first decode builds the argmax table, the heads,
    speculative_generate_batch(model, images, prompts, new_tokens)  # packed weights
    model.step_states, model.verify_step = hook("greedy", model.step_states), hook("spec", model.verify_step)
    try:
        for _ in range(repeats):
            for name, decode in (("greedy", generate), ("spec", speculative_generate_batch)):
                calls.clear()
                total = timed(lambda: decode(model, images, prompts, new_tokens))
                if not calls.get(name):
                    raise SystemExit(f"--base: {name} decoding made no model call after the prefill "
                                     f"(--new-tokens {new_tokens}); use --new-tokens 2 or more")
                prefill = calls[name + " prefill"][0]
                parts.setdefault(name + " prefill", []).append(prefill)
                parts.setdefault(name, []).append((total - prefill) / len(calls[name]))
    finally:  # the class's methods again
        del model.step_states, model.verify_step
    med = {k: statistics.median(v) for k, v in parts.items()}
    return {"greedy_prefill_s": med["greedy prefill"], "greedy_step_s": med["greedy"],
            "spec_prefill_s": med["spec prefill"], "spec_call_s": med["spec"]}


def compare_sampling(model, images: torch.Tensor, B: int, new_tokens: int, repeats: int, temperature: float,
                     top_p: float) -> dict:
    """Plain sampling (`generate`, temperature > 0) vs speculative sampling over all images in batches of B;
    medians of alternating repeats, each repeat with its own seed (the samples differ, so tokens/s counts what
    each decode emitted)."""
    from vlm_dist.infer.generate import generate
    from vlm_dist.infer.spec_sampling import speculative_sample_batch
    from vlm_dist.infer.speculative import merge_stats
    from vlm_dist.text import get_tokenizer, prompt_tokens

    prompt = prompt_tokens(get_tokenizer())
    batches = [images[i : i + B] for i in range(0, len(images), B)]
    plain_tps, spec_tps, parts = [], [], []
    for rep in range(repeats):
        g = torch.Generator().manual_seed(rep)
        plain: list = []
        t = timed(lambda: [plain.extend(generate(model, b, [prompt] * len(b), new_tokens, temperature=temperature,
                                                 top_p=top_p, generator=g)) for b in batches])
        plain_tps.append(sum(map(len, plain)) / t)
        spec: list = []
        t = timed(lambda: [spec.append(speculative_sample_batch(model, b, [prompt] * len(b), new_tokens, temperature,
                                                                top_p, generator=g)) for b in batches])
        stats = merge_stats([st for _, st in spec])
        spec_tps.append(stats["tokens"] / t)
        parts.append(stats)
    stats = merge_stats(parts)
    return {"batch": B, "plain_tps": statistics.median(plain_tps), "spec_tps": statistics.median(spec_tps),
            "speedup": statistics.median(s / p for s, p in zip(spec_tps, plain_tps)),
            "tokens_per_call": stats["tokens_per_call"], "accepted": stats["accepted_per_position"]}


@torch.no_grad()
def profile_calls(model, images: torch.Tensor, B: int, calls: int = 100, top: int = 10) -> None:
    """torch.profiler over `calls` greedy steps and `calls` verify calls (batch B, the model's caption
    prompt, a fixed 4-token draft, the cache cropped back after each): wall time per call and the ops
    with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    from vlm_dist.text import get_tokenizer, prompt_tokens

    prompt = torch.tensor([prompt_tokens(get_tokenizer())] * B)
    images = images[:B]
    greedy_cache = model.new_cache(B)
    model.step_states(prompt, greedy_cache, images=images, next_token_only=True)
    g_len, tok = greedy_cache.lengths[0], torch.full((B, 1), 320)
    spec_cache, heads = model.new_cache(B, model.cfg.max_seq_len + model.cfg.n_future), model.fused_heads()
    model.verify_step(prompt, spec_cache, images=images, last=torch.full((B,), prompt.shape[1] - 1), heads=heads)
    s_len, draft = spec_cache.lengths[0], torch.tensor([[320, 2442, 736, 7117][: model.cfg.n_future]] * B)

    def greedy_step():
        greedy_cache.crop(g_len)
        return model.greedy_ids(model.step_states(tok, greedy_cache, next_token_only=True)[0][:, -1])

    def verify_call():
        spec_cache.crop(s_len)
        return model.verify_step(draft, spec_cache, heads=heads)

    for name, fn in (("greedy step", greedy_step), ("verify call", verify_call)):
        for _ in range(20):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            wall = (time.perf_counter() - t) / calls
        ops = prof.key_averages()
        self_us = sum(e.self_cpu_time_total for e in ops) / calls
        print(f"\n{name}, batch {B}: {1e6 * wall:.0f} us per call under the profiler, ops' self time {self_us:.0f} us, "
              f"{sum(e.count for e in ops) / calls:.0f} ops per call\n| op | self us per call | calls per call |\n|---|---|---|")
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"| {e.key} | {e.self_cpu_time_total / calls:.1f} | {e.count / calls:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained export folder (n_future > 1) for part 1")
    p.add_argument("--shards", help="validation shards (default: --scenes demo scenes rendered in memory)")
    p.add_argument("--scenes", type=int, default=32, help="validation images")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="inference dtype of the trained model (part 1) and of the --base models")
    p.add_argument("--packing", default="on", choices=["on", "off", "both"],
                   help="bf16 on a CPU: decode through weights packed for oneDNN (model/packed.py), F.linear, or both side by side")
    p.add_argument("--base", action="store_true", help="also the base-width call costs and projected speed-up")
    p.add_argument("--cache-table", action="store_true", help="also cached vs uncached greedy (random demo weights)")
    p.add_argument("--profile", action="store_true", help="only profile one greedy step and one verify call per --batches (1 thread)")
    p.add_argument("--sampling", type=float, metavar="T", help="part 1 samples at temperature T instead: plain sampling vs "
                   "speculative sampling (infer/spec_sampling.py)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sampling")
    args = p.parse_args(argv)
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM, packed

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # packing applies to bf16 on a CPU only: fp32 rows are F.linear's whatever --packing says
    packings = {"on": [True], "off": [False], "both": [False, True]}[args.packing] if args.dtype == "bf16" else [False]

    def pack_label(pack: bool) -> str:
        return "yes" if pack and packed.AVAILABLE else "no"

    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    results = {}
    if args.model:
        from vlm_dist.infer.load import load_exported

        model, cfg = load_exported(args.model, dtype=dtype)
        images = load_images(model, args.shards, args.scenes)
        if args.profile:
            torch.set_num_threads(1)
            for B in args.batches:
                profile_calls(model, images, B)
            return
        if args.sampling:
            print(f"\n{args.model} (n_future={cfg.n_future}, {args.dtype}), {len(images)} images, captions, <= {args.new_tokens} "
                  f"tokens, sampling at temperature {args.sampling}, top-p {args.top_p}\n"
                  "| threads | batch | plain sampling tok/s | speculative sampling tok/s | speed-up (median of paired repeats) | "
                  "tokens/call | kept per draft position |\n|---|---|---|---|---|---|---|")
            for threads in args.threads:
                torch.set_num_threads(threads)
                for B in args.batches:
                    r = compare_sampling(model, images, B, args.new_tokens, args.repeats, args.sampling, args.top_p)
                    acc = " ".join(f"{a:.2f}" for a in r["accepted"])
                    print(f"| {threads} | {B} | {r['plain_tps']:.0f} | {r['spec_tps']:.0f} | {r['speedup']:.2f}x | "
                          f"{r['tokens_per_call']:.2f} | {acc} |", flush=True)
            print(f"\nload average {os.getloadavg()[0]:.1f} at end")
            return
        print(f"\n{args.model} (n_future={cfg.n_future}, {args.dtype}), {len(images)} images, captions, <= {args.new_tokens} tokens\n"
              "| threads | batch | packed | greedy before tok/s | greedy tok/s | speculative tok/s | speed-up (wall) | speed-up (CPU time) | "
              "tokens/call | accepted per draft position | identical | uncertified argmax rows |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        same = True  # packed and F.linear decode the same tokens, in every configuration
        for threads in args.threads:
            torch.set_num_threads(threads)
            for B in args.batches:
                for pack in packings:
                    packed.enabled = pack
                    r = results[threads, B, pack] = compare(model, images, B, args.new_tokens, args.repeats)
                    same &= r["rows"] == results[threads, B, packings[0]]["rows"]
                    acc = " ".join(f"{a:.2f}" for a in r["accepted"])
                    print(f"| {threads} | {B} | {pack_label(pack)} | {r['legacy_tps']:.0f} | {r['greedy_tps']:.0f} | {r['spec_tps']:.0f} | "
                          f"{r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | {r['tokens_per_call']:.2f} | {acc} | {r['identical']} | "
                          f"{r['fallback']:.1%} |", flush=True)
        if len(packings) == 2:
            print(f"packed and F.linear decode the same tokens in every configuration: {same}")
    if args.base and results:
        widths = {"demo (random weights)": load_config("demo", ["model.n_future=4"]).model,
                  "base 24x768 (random weights)": load_config("base", ["model.vision.model_name=vlm-tiny-vit", "model.vision.freeze=false",
                                                                      "model.vision.pretrained=null"]).model}
        print(f"\nprice of a call ({args.dtype}, random weights). Projected speed-up: a batch of the trained model above, at\n"
              "this width: (greedy prefill + its greedy steps x step) / (speculative prefill + its verify calls x call), with\n"
              "the steps and calls per batch that the trained model took (part 1).\n"
              "argmax 'full': random weights fail the certificate, every argmax row falls back to the full matmul;\n"
              "'certified': the certificate's checks run but every row counts as certified (timing only: the trained\n"
              "demo model certifies all its rows, a trained base model is assumed to)\n"
              "| decoder | argmax | threads | batch | packed | greedy prefill ms | greedy step ms | speculative prefill ms | "
              "verify call ms | call / step | projected speed-up | measured (trained demo) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, mcfg in widths.items():
            torch.manual_seed(0)
            m = VLM(mcfg).to(dtype).eval()
            for mode in ("full", "certified"):
                if mode == "certified":
                    m.argmax_table().slack = float("-inf")  # every row passes (the weights do not change meanwhile)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for B in args.batches:
                        for pack in packings:
                            packed.enabled = pack
                            c = call_costs(m, B, args.new_tokens, args.repeats)
                            r = results.get((threads, B, pack))
                            proj = "-"
                            if r:
                                greedy = c["greedy_prefill_s"] + r["greedy_steps_per_batch"] * c["greedy_step_s"]
                                proj = f"{greedy / (c['spec_prefill_s'] + r['spec_calls_per_batch'] * c['spec_call_s']):.2f}x"
                            meas = f"{r['speedup']:.2f}x" if r and name.startswith("demo") else ""
                            ms = " | ".join(f"{1e3 * c[k]:.2f}" for k in ("greedy_prefill_s", "greedy_step_s", "spec_prefill_s", "spec_call_s"))
                            print(f"| {name} | {mode} | {threads} | {B} | {pack_label(pack)} | {ms} | "
                                  f"{c['spec_call_s'] / c['greedy_step_s']:.2f} | {proj} | {meas} |", flush=True)
    if args.cache_table:
        from vlm_dist.infer.generate import generate
        from vlm_dist.text import get_tokenizer, prompt_tokens

        torch.manual_seed(0)
        m = VLM(load_config("demo").model).eval()
        size = m.cfg.vision.geometry["image_size"]
        print("\n| batch | KV cache | seconds (median) | tokens/s |\n|---|---|---|---|")
        for B in args.batches:
            images = torch.randn(B, 3, size, size)
            prompts = [prompt_tokens(get_tokenizer())] * B
            for cached in (True, False):
                t = statistics.median(timed(lambda: generate(m, images, prompts, args.new_tokens, use_cache=cached))
                                      for _ in range(args.repeats))
                print(f"| {B} | {'yes' if cached else 'no'} | {t:.3f} | {B * args.new_tokens / t:.0f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
