"""KV-cached greedy vs self-speculative decoding, tokens/s at batch 1 and 8, for tools/bench_gpu.py.

    rows = bench_decode(model, batches=[1, 8], new_tokens=32, repeats=3)

The model has random weights (nothing can be downloaded): random heads rarely agree with the trunk
and rarely emit the end token, so every row decodes all `new_tokens` tokens and speculative decoding
accepts ~1 token per model call. These figures therefore measure the cost of the decoding machinery
(greedy: one cached step per token; speculative: one cached verify step over n_future draft tokens
plus the extra heads, per accepted token) at the model's width, not the speed-up trained heads give
(tools/bench_decode.py --model EXPORT --shards VAL measures that on a trained export).
Greedy and speculative runs alternate `repeats` times; medians.
"""

from __future__ import annotations

import statistics
import time

import torch


# --- the calls into vlm_dist.infer: keep them here ------------------------------------------------

def greedy(model, images: torch.Tensor, prompt: list[int], new_tokens: int) -> list[list[int]]:
    """Batched KV-cached greedy decoding of B rows: vlm_dist.infer.generate.generate."""
    from vlm_dist.infer.generate import generate

    return generate(model, images, [prompt] * images.shape[0], new_tokens)


def speculative(model, images: torch.Tensor, prompt: list[int], new_tokens: int) -> tuple[list[list[int]], int]:
    """Batched self-speculative greedy decoding of B rows in one loop -> (ids per row, model calls summed
    over the rows still decoding, so that tokens / calls is the tokens per call of one row)."""
    from vlm_dist.infer.speculative import speculative_generate_batch

    ids, stats = speculative_generate_batch(model, images, [prompt] * images.shape[0], new_tokens)
    return ids, stats["row_calls"]


# --- measurement ---------------------------------------------------------------------------------

def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, result


@torch.no_grad()
def bench_decode(model, batches: list[int], new_tokens: int, repeats: int, log=print) -> list[dict]:
    from vlm_dist.text import get_tokenizer, prompt_tokens

    device = next(model.parameters()).device
    model.eval()
    prompt = prompt_tokens(get_tokenizer())
    size = model.cfg.vision.geometry["image_size"]
    rows = []
    for B in batches:
        images = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(B)).to(device)
        greedy(model, images[:1], prompt, 2)  # warm-up (kernels, allocator)
        speculative(model, images[:1], prompt, 2)
        g_t, s_t = [], []
        for _ in range(repeats):
            t, g_ids = _timed(lambda: greedy(model, images, prompt, new_tokens), device)
            g_t.append(t)
            t, (s_ids, calls) = _timed(lambda: speculative(model, images, prompt, new_tokens), device)
            s_t.append(t)
        g_tokens, s_tokens = sum(map(len, g_ids)), sum(map(len, s_ids))
        row = {"batch": B, "new_tokens": new_tokens, "greedy_s": statistics.median(g_t),
               "speculative_s": statistics.median(s_t), "greedy_tokens": g_tokens, "speculative_tokens": s_tokens,
               "greedy_tokens_s": g_tokens / statistics.median(g_t),
               "speculative_tokens_s": s_tokens / statistics.median(s_t),
               "tokens_per_call": s_tokens / max(calls, 1),
               "identical_rows": sum(a == b for a, b in zip(g_ids, s_ids))}
        log(f"  batch {B}: greedy {row['greedy_tokens_s']:.0f} tokens/s, speculative {row['speculative_tokens_s']:.0f} "
            f"tokens/s ({row['tokens_per_call']:.2f} tokens/call), identical rows {row['identical_rows']}/{B}")
        rows.append(row)
    return rows
