"""Sampling before and after round 12, side by side in one process: plain sampling (`generate`) and speculative
sampling, at --top-p, on a trained export's demo scenes. "before" swaps round 11's code back in: the full sort over
the vocabulary in sampling_probs' nucleus, and, for plain sampling, the full (B, V) logits of every step instead of
infer/shortlist_sampling.py. Same seeds. Speculative sampling must draw the same tokens before and after (its
distributions are equal to the bit on a CPU); plain sampling draws from the same distribution by another rule
(tests/test_shortlist_sampling.py), so its tokens differ.

    OMP_NUM_THREADS=1 python docs/bench/issue9_round12/topp_bench.py --model EXPORT --scenes 32 --batches 1 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """sampling_probs' cut before round 12: every row sorted over the whole vocabulary."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p > top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args()
    import vlm_dist.infer.generate as gen
    from bench_decode import load_images
    from vlm_dist.infer.load import load_exported
    from vlm_dist.infer.spec_sampling import speculative_sample_batch
    from vlm_dist.text import get_tokenizer, prompt_tokens

    torch.set_num_threads(1)
    model, cfg = load_exported(args.model)
    images = load_images(model, None, args.scenes)
    prompt = prompt_tokens(get_tokenizer())
    new, new_states = gen.nucleus, gen.sample_states

    def full_states(model_, states, temperature, top_p, generator):  # round 11: the (B, V) logits every step
        return gen.sample(gen.sampling_probs(model_.lm_head(states), temperature, top_p), generator)
    counts = []  # candidates per row in the new code's calls (how much it sorts)
    real_cut = gen.cut_rows
    gen.cut_rows = lambda probs, top_p, k: counts.append(k) or real_cut(probs, top_p, k)
    decoders = {"plain": lambda b, g: gen.generate(model, b, [prompt] * len(b), args.new_tokens, temperature=args.temperature,
                                                   top_p=args.top_p, generator=g),
                "speculative": lambda b, g: speculative_sample_batch(model, b, [prompt] * len(b), args.new_tokens,
                                                                     args.temperature, args.top_p, generator=g)[0]}
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}; {args.model} (n_future "
          f"{cfg.n_future}), {len(images)} scenes, captions <= {args.new_tokens} tokens, temperature {args.temperature}, "
          f"top-p {args.top_p}, medians of {args.repeats} alternating repeats\n"
          "| decoder | batch | before tok/s | after tok/s | after / before (median of paired) | same tokens |\n|---|---|---|---|---|---|")
    for name, decode in decoders.items():
        for B in args.batches:
            batches = [images[i : i + B] for i in range(0, len(images), B)]
            tps, same = {"before": [], "after": []}, True
            for rep in range(args.repeats):
                outs = {}
                for which in ("before", "after") if rep % 2 == 0 else ("after", "before"):
                    gen.nucleus = full_sort_nucleus if which == "before" else new
                    gen.sample_states = full_states if which == "before" else new_states
                    g = torch.Generator().manual_seed(rep)
                    t = time.perf_counter()
                    outs[which] = [row for b in batches for row in decode(b, g)]
                    tps[which].append(sum(map(len, outs[which])) / (time.perf_counter() - t))
                same &= outs["before"] == outs["after"]
            ratio = statistics.median(a / b for a, b in zip(tps["after"], tps["before"]))
            print(f"| {name} | {B} | {statistics.median(tps['before']):.0f} | {statistics.median(tps['after']):.0f} | "
                  f"{ratio:.2f}x | {same} |", flush=True)
    gen.nucleus, gen.sample_states = new, new_states
    if counts:
        counts.sort()
        print(f"\ncandidates sorted per call by the new code: median {counts[len(counts) // 2]}, max {counts[-1]} "
              f"({sum(c == 49408 for c in counts)} of {len(counts)} calls took the full sort)")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
