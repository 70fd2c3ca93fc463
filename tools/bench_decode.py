"""Greedy decoding speed: KV-cached vs uncached at batch 1 and 8, and self-speculative decoding.

    python tools/bench_decode.py                          # demo-preset architecture, random weights
    python tools/bench_decode.py --model runs/demo/export --shards data/demo/shards/val   # a trained model

The cache table always uses random weights of the same architecture: they rarely emit the end token, so every row decodes the full --new-tokens and the
tokens/s figures compare like with like. Self-speculative decoding needs heads that agree with the
trunk, i.e. a trained model: with --model it reports tokens per model call and tokens/s on real
validation images (captions), beside plain cached greedy decoding on the same images.
Each measurement is repeated (--repeats) in alternation; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_cache(model, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from vlm_dist.infer.generate import generate
    from vlm_dist.text import get_tokenizer, prompt_tokens

    tok = get_tokenizer()
    size = model.cfg.vision.geometry["image_size"]
    rows = []
    for B in batches:
        images = torch.randn(B, 3, size, size)
        prompts = [prompt_tokens(tok)] * B
        times = {True: [], False: []}
        for _ in range(repeats):
            for cached in (True, False):
                times[cached].append(timed(lambda: generate(model, images, prompts, new_tokens, use_cache=cached)))
        for cached in (True, False):
            med = statistics.median(times[cached])
            rows.append({"batch": B, "kv_cache": cached, "seconds": med, "tokens_per_s": B * new_tokens / med})
    return rows


def bench_speculative(model, shards: str, n_images: int, new_tokens: int, repeats: int) -> dict:
    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.evaluate import iter_shard_samples
    from vlm_dist.infer.generate import generate
    from vlm_dist.infer.speculative import speculative_generate
    from vlm_dist.text import get_tokenizer, prompt_tokens

    tok = get_tokenizer()
    to_tensor = ImageToTensor(model.cfg.vision.geometry["image_size"])
    images = [to_tensor(jpg) for _, jpg, _ in iter_shard_samples(shards, n_images)]
    prompt = prompt_tokens(tok)
    spec_t, greedy_t, calls, tokens, same = [], [], 0, 0, True
    for r in range(repeats):
        outs = []
        spec_t.append(timed(lambda: outs.extend(speculative_generate(model, im, prompt, new_tokens) for im in images)))
        greedy = []
        greedy_t.append(timed(lambda: greedy.extend(generate(model, im[None], [prompt], new_tokens)[0] for im in images)))
        if r == 0:
            calls = sum(s["calls"] for _, s in outs)
            tokens = sum(len(ids) for ids, _ in outs)
            same = [ids for ids, _ in outs] == greedy
    return {"images": len(images), "generated_tokens": tokens, "model_calls": calls,
            "tokens_per_call": tokens / max(calls, 1), "identical_to_greedy": same,
            "speculative_tokens_per_s": tokens / statistics.median(spec_t),
            "greedy_tokens_per_s": tokens / statistics.median(greedy_t),
            "speedup": statistics.median(greedy_t) / statistics.median(spec_t)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an export folder (default: the demo architecture with random weights)")
    p.add_argument("--shards", help="validation shards for the speculative measurement (needs --model)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=32, help="validation images for the speculative run")
    args = p.parse_args(argv)
    if args.shards and not args.model:
        p.error("--shards needs --model: speculative decoding is only meaningful with trained heads")
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM

    trained = None
    if args.model:
        from vlm_dist.infer.load import load_exported

        trained, model_cfg = load_exported(args.model)
    else:
        model_cfg = load_config("demo").model
    torch.manual_seed(0)
    random = VLM(model_cfg).eval()  # same architecture; random weights decode every row to full length
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"| batch | KV cache | seconds (median, {args.new_tokens} tokens per row) | tokens/s |\n|---|---|---|---|")
    for r in bench_cache(random, args.batches, args.new_tokens, args.repeats):
        print(f"| {r['batch']} | {'yes' if r['kv_cache'] else 'no'} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} |")
    if args.shards:
        s = bench_speculative(trained, args.shards, args.images, args.new_tokens, max(1, args.repeats // 2))
        print(f"\nself-speculative (batch 1, {s['images']} val captions, n_future={trained.cfg.n_future}): "
              f"{s['tokens_per_call']:.2f} tokens per model call, {s['speculative_tokens_per_s']:.0f} tokens/s vs "
              f"{s['greedy_tokens_per_s']:.0f} greedy ({s['speedup']:.2f}x); identical to greedy: {s['identical_to_greedy']}")


if __name__ == "__main__":
    main()
