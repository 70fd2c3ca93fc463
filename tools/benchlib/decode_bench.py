"""KV-cached greedy vs self-speculative decoding, tokens/s at batch 1 and 8, for tools/bench_gpu.py.

    rows = bench_decode(model, batches=[1, 8], new_tokens=32, repeats=3)

The model has random weights (nothing can be downloaded), or is a trained export given with images it
learned (bench_gpu.py --decode-model). With random weights, how many draft tokens it accepts depends on
what it happens to predict: at base width in bf16 on an H100 it repeated one token and accepted 3.2
per call (docs/bench/gpu_round5.md); tokens per call is measured, never assumed. These figures measure
the cost of the decoding machinery (greedy: one cached step per token; speculative: one cached verify
step over n_future draft tokens plus the extra heads) at the model's width, not the speed-up trained
heads give (tools/bench_decode.py --model EXPORT --shards VAL measures that on a trained export).
Greedy and speculative runs alternate `repeats` times, each also with static=True (fixed-shape steps that a
GPU replays as CUDA graphs, vlm_dist/infer/static.py); medians. A decode of a new shape captures its graph;
later decodes of that shape replay it (vlm_dist.infer.static.session), as an evaluation's batches do: the first
static decode of each batch size (capture included) is timed on its own, the repeats replay.

    prof = profile_decode(model, images, prompt, new_tokens)   # per token: host ops, launches, syncs

profile_decode counts, per emitted token, what the host does for each decoder: aten ops, kernel
launches and device synchronisations (CUDA runtime calls in torch.profiler's trace). Where a decode is
launch-bound (batch 1 on a GPU), these counts, not FLOPs, set its speed.
"""

from __future__ import annotations

import statistics
import time

import torch


# --- the calls into vlm_dist.infer: keep them here ------------------------------------------------

def greedy(model, images: torch.Tensor, prompt: list[int], new_tokens: int, static: bool = False) -> list[list[int]]:
    """Batched KV-cached greedy decoding of B rows: vlm_dist.infer.generate.generate (static: fixed-shape
    steps, a CUDA graph on a GPU: vlm_dist.infer.static)."""
    from vlm_dist.infer.generate import generate

    return generate(model, images, [prompt] * images.shape[0], new_tokens, static=static)


def speculative(model, images: torch.Tensor, prompt: list[int], new_tokens: int,
                static: bool = False) -> tuple[list[list[int]], int]:
    """Batched self-speculative greedy decoding of B rows in one loop -> (ids per row, model calls summed
    over the rows still decoding, so that tokens / calls is the tokens per call of one row)."""
    from vlm_dist.infer.speculative import speculative_generate_batch

    ids, stats = speculative_generate_batch(model, images, [prompt] * images.shape[0], new_tokens, static=static)
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
def bench_decode(model, batches: list[int], new_tokens: int, repeats: int, log=print,
                 images: torch.Tensor | None = None) -> list[dict]:
    """Rows of tokens/s per batch size; batch B decodes images[:B] (given: e.g. the scenes a trained export
    learned), else B random images."""
    from vlm_dist.text import get_tokenizer, prompt_tokens

    device = next(model.parameters()).device
    model.eval()
    prompt = prompt_tokens(get_tokenizer())
    size = model.cfg.vision.geometry["image_size"]
    if images is not None and images.shape[0] < max(batches):
        raise ValueError(f"{images.shape[0]} images for batches up to {max(batches)}")
    pool = images
    rows = []
    for B in batches:
        images = pool[:B].to(device) if pool is not None else torch.randn(
            B, 3, size, size, generator=torch.Generator().manual_seed(B)).to(device)
        model.drop_decode_caches()  # no graph kept from an earlier shape or run
        greedy(model, images[:1], prompt, 2)  # warm-up (kernels, allocator, the argmax table)
        speculative(model, images[:1], prompt, 2)
        gs_first, _ = _timed(lambda: greedy(model, images, prompt, new_tokens, static=True), device)  # captures
        ss_first, _ = _timed(lambda: speculative(model, images, prompt, new_tokens, static=True), device)
        g_t, s_t, gs_t, ss_t = [], [], [], []
        for _ in range(repeats):
            t, g_ids = _timed(lambda: greedy(model, images, prompt, new_tokens), device)
            g_t.append(t)
            t, (s_ids, calls) = _timed(lambda: speculative(model, images, prompt, new_tokens), device)
            s_t.append(t)
            # fixed-shape steps (CUDA graphs on a GPU, replaying what the first decode of this shape captured)
            t, gs_ids = _timed(lambda: greedy(model, images, prompt, new_tokens, static=True), device)
            gs_t.append(t)
            t, (ss_ids, _) = _timed(lambda: speculative(model, images, prompt, new_tokens, static=True), device)
            ss_t.append(t)
        g_tokens, s_tokens = sum(map(len, g_ids)), sum(map(len, s_ids))
        row = {"batch": B, "new_tokens": new_tokens, "greedy_s": statistics.median(g_t),
               "speculative_s": statistics.median(s_t), "greedy_tokens": g_tokens, "speculative_tokens": s_tokens,
               "greedy_tokens_s": g_tokens / statistics.median(g_t),
               "speculative_tokens_s": s_tokens / statistics.median(s_t),
               "tokens_per_call": s_tokens / max(calls, 1),
               "identical_rows": sum(a == b for a, b in zip(g_ids, s_ids)),
               "greedy_static_tokens_s": g_tokens / statistics.median(gs_t),
               "speculative_static_tokens_s": s_tokens / statistics.median(ss_t),
               "greedy_static_first_tokens_s": g_tokens / gs_first, "speculative_static_first_tokens_s": s_tokens / ss_first,
               "static_identical_rows": sum(a == b == c for a, b, c in zip(g_ids, gs_ids, ss_ids))}
        log(f"  batch {B}: greedy {row['greedy_tokens_s']:.0f} tokens/s, speculative {row['speculative_tokens_s']:.0f} "
            f"tokens/s ({row['tokens_per_call']:.2f} tokens/call), identical rows {row['identical_rows']}/{B}; "
            f"static: greedy {row['greedy_static_tokens_s']:.0f}, speculative {row['speculative_static_tokens_s']:.0f} "
            f"tokens/s (first decode, capture included: {row['greedy_static_first_tokens_s']:.0f}, "
            f"{row['speculative_static_first_tokens_s']:.0f}), identical rows {row['static_identical_rows']}/{B}")
        rows.append(row)
    return rows


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


@torch.no_grad()
def profile_decode(model, images: torch.Tensor, prompt: list[int], new_tokens: int, top: int = 8) -> dict:
    """torch.profiler over one greedy and one speculative decode of `images`, each also with static=True: per
    emitted token, the host's aten ops, kernel launches (a CUDA graph's replay counts as one) and device
    synchronisations, and the ops with the most self CPU time (each decoder runs once unprofiled first: a
    static decode then replays the graphs that run captured)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in [("greedy", lambda: greedy(model, images, prompt, new_tokens)),
                     ("speculative", lambda: speculative(model, images, prompt, new_tokens)[0]),
                     ("greedy static", lambda: greedy(model, images, prompt, new_tokens, static=True)),
                     ("speculative static", lambda: speculative(model, images, prompt, new_tokens, static=True)[0])]:
        fn()  # warm-up
        with profile(activities=acts) as prof:
            wall, ids = _timed(fn, device)
        tokens = max(1, sum(map(len, ids)))
        events = prof.key_averages()

        def count(names) -> int:
            return sum(e.count for e in events if e.key in names)

        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {"tokens": tokens, "ms_per_token": 1e3 * wall / tokens,
                     "aten_ops_per_token": sum(e.count for e in events if e.key.startswith("aten::")) / tokens,
                     "launches_per_token": count(LAUNCH_CALLS) / tokens, "syncs_per_token": count(SYNC_CALLS) / tokens,
                     "top": [{"name": e.key[:80], "self_cpu_us_per_token": e.self_cpu_time_total / tokens,
                              "calls_per_token": e.count / tokens} for e in ranked]}
    return out
