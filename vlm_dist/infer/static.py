"""Fixed-shape decoding steps, which a GPU replays as CUDA graphs.

    nxt = StaticSteps(model, cache).greedy(ids, lengths)                  # (B,) next ids after ids (B, 1)
    nxt, last, guesses = StaticSteps(model, cache).verify(draft, lengths) # one self-speculative verify call
    generate(model, images, prompts, static=True)                         # infer/generate.py
    speculative_generate_batch(model, images, prompts, static=True)       # infer/speculative.py
    s = session(model, "greedy", B, max_len)   # a cache + the step captured over it by an earlier decode

The cached decoding in model/ (KVCache, Block.decode) slices the cache at Python-int lengths, so a step's
shapes and host work change from call to call. Here a step takes each row's length as a device tensor,
writes its keys and values at those positions (index_put), attends over the whole preallocated cache with
a mask that hides the positions past each row's query, and takes the exact argmax over the full vocabulary
on the device (on a CPU the certified shortlist argmax, which gives the same ids without a GPU's graph to
keep). Nothing inside a CUDA step depends on a host-side number, so its kernels, shapes and addresses are
the same at every call: on CUDA, `graphed` captures it once as a torch.cuda.CUDAGraph and each call is one
replay instead of ~15 launches per block (on one H100, round 5, a `base`-width greedy token took ~10 ms at
batch 1, which the profile's launch counts called launch-bound). On one H200 (round 9, docs/bench/gpu_round9.md,
`base` width, bf16, random weights, the graphs captured inside each timed decode) greedy ran at 3.9x / 3.4x the
dynamic path's tokens/s at batch 1 / 8 and self-speculative at 2.1x / 2.5x, with the same rows. So decoding
takes these steps by default on a GPU (`static_default`). On a CPU the steps run eagerly, at 0.93-0.99x the
dynamic path's speed, so a CPU keeps the dynamic path; the tests check on the CPU that the steps decode what
the dynamic path decodes (tests/test_static_decode.py; on a GPU the kernels differ from the dynamic path's,
so a near-tie could round either way).

The prefill (image tower + prompts, variable length) stays on the dynamic path and fills the same KVCache.

A capture costs about three eager steps (two warm-ups, the capture), which round 9 paid inside every timed decode.
`session` keeps each decode's cache and captured step on the model, so the next decode of the same kind, batch
size, cache length, device and dtype (an evaluation's batches, the trainer's generation evals) replays the graph
captured before; the steps read the cache and every weight in place, and a change of weights starts afresh.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

from vlm_dist.model.decoder import KVCache
from vlm_dist.model.stamps import stamps

MAX_SESSIONS = 4  # sessions kept per model (an evaluation needs two per decoder: its batch size and the last batch's)


def static_default(device: torch.device) -> bool:
    """Whether greedy decoding takes the fixed-shape steps when the caller does not say: on a CUDA device
    (replayed as CUDA graphs, several times faster there), not on a CPU (no graphs: slightly slower)."""
    return device.type == "cuda"


class Session:
    """One decode shape's KV cache and the static step captured over it (`run`, None until the first decode
    captures it), kept on the model by `session`."""

    def __init__(self, cache: KVCache, weights: tuple) -> None:
        self.cache, self.weights, self.run = cache, weights, None


def session(model, kind: str, batch: int, max_len: int) -> Session:
    """The Session for `kind` ("greedy" or "verify") decodes of `batch` rows over a `max_len` cache, its cache
    emptied (lengths 0: the prefill writes from the start, and the steps mask what an earlier decode left
    beyond each row's length). Reused from an earlier decode while no weight has changed: an optimizer step,
    a load or .to() changes a parameter's stamp (model/stamps.py: data_ptr, version); a write through `.data` (DeepSpeed's ZeRO)
    changes neither, and VLM.drop_decode_caches drops the sessions for it. At most MAX_SESSIONS, least
    recently used first out."""
    p = model.lm_head.weight
    key = (kind, batch, max_len, p.device, p.dtype)
    weights = stamps(model.parameters())
    store = model.__dict__.setdefault("_static_sessions", OrderedDict())
    if any(other.weights != weights for other in store.values()):
        store.clear()  # the weights changed: every session's step read the old ones (its stacked heads)
    s = store.get(key)
    if s is None:
        s = store[key] = Session(model.new_cache(batch, max_len), weights)
    else:  # emptied: a masked key is never attended, but a masked NaN or inf (a bad image) would still poison
        s.cache.crop(0)  # the attention's weighted sum (0 x NaN), row by row, in every later decode
        s.cache.k.zero_()
        s.cache.v.zero_()
    store.move_to_end(key)
    while len(store) > MAX_SESSIONS:
        store.popitem(last=False)
    return s


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class StaticSteps:
    """Greedy and verify steps of `model` over `cache`'s buffers (cache.k / cache.v, (L, B, H, M, hd)),
    with per-row lengths given as a (B,) long tensor on the cache's device. The steps write the cache's
    buffers but leave its Python `lengths` to the caller."""

    def __init__(self, model, cache: KVCache) -> None:
        # a weak reference: the model keeps its sessions, which keep their steps (no reference cycle, so `del
        # model` frees the GPU memory without waiting for the garbage collector)
        self.model, self.cache = weakref.proxy(model), cache
        self.heads = None  # the stacked extra heads, built by the first verify (its eager warm-up on a GPU)
        # kept here: a captured step reads this tensor's memory, which the model replaces for another dtype
        self.table = model._position_table(cache.k.dtype, cache.k.device)

    def _trunk(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) at positions lengths[b] + 0..T-1 -> (trunk states (B, T, D), positions (B, T))."""
        model, k_all, v_all = self.model, self.cache.k, self.cache.v
        B, T = ids.shape
        M, dev = k_all.shape[3], ids.device
        pos = lengths[:, None] + torch.arange(T, device=dev)  # (B, T)
        x = model.tok_emb(ids)
        x = x + self.table[pos]
        keys = torch.arange(M, device=dev)
        causal = keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, M): also hides stale keys
        masks = {0: _additive(causal, x.dtype)}
        rows = torch.arange(B, device=dev)[:, None]  # (B, 1)
        for layer, block in enumerate(model.blocks):
            a = block.attn
            P = a.hide_image
            if P not in masks:  # text queries (position >= P) see no image key (< P): text_first_layers
                masks[P] = _additive(causal & ((pos[:, None, :, None] < P) | (keys >= P)), x.dtype)
            qkv = block._linear(block._norm(block.ln1, x), a.qkv)
            q, k, v = qkv.view(B, T, 3, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
            k_all[layer][rows, :, pos] = k.transpose(1, 2)  # (B, T, H, hd) at each row's positions
            v_all[layer][rows, :, pos] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k_all[layer], v_all[layer], attn_mask=masks[P])  # (B, H, T, hd)
            x = x + block._linear(y.transpose(1, 2).reshape(B, T, -1), a.out)
            x = x + block._mlp(block._norm(block.ln2, x))
        return x, pos

    def _argmax(self, states: torch.Tensor) -> torch.Tensor:
        """Exact argmax over the full vocabulary of (..., D) normalised states: (...). On a GPU the full
        logits' argmax (a graph holds no data-dependent branch); elsewhere the certified shortlist argmax
        (VLM.greedy_ids: the same ids, 4x faster on a CPU at the demo's width, its fallback a host branch)."""
        if states.device.type == "cuda":
            return self.model.lm_head(states).argmax(dim=-1)
        return self.model.greedy_ids(states)

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed ids (B, 1) after each row's `lengths` (B,) positions; head 0's next ids (B,)."""
        h, _ = self._trunk(ids, lengths)
        return self._argmax(self.model.norm(h[:, -1]))

    @torch.no_grad()
    def verify(self, draft: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VLM.verify_step for a draft (B, n) after each row's `lengths`: (next ids (B,), last (B,), the extra
        heads' guesses (B, n-1)); draft token i+1 is accepted while it equals head 0's argmax after token i."""
        model = self.model
        h, pos = self._trunk(draft, lengths)
        greedy = self._argmax(model.norm(h))  # (B, T)
        last = (draft[:, 1:] == greedy[:, :-1]).long().cumprod(dim=1).sum(dim=1)  # (B,)
        next_ids = greedy.gather(1, last[:, None]).squeeze(1)
        if model.cfg.n_future == 1:
            return next_ids, last, next_ids[:, None][:, :0]
        if self.heads is None:
            self.heads = model.fused_heads()
        heads, first = self.heads, model.cfg.n_layers
        B, T = draft.shape
        qkv = heads.project(h)  # (B, T, m, 3, H, hd)
        k_all, v_all = self.cache.k[first : first + heads.m], self.cache.v[first : first + heads.m]  # (m, B, H, M, hd)
        rows = torch.arange(B, device=h.device)[:, None]
        k_all[:, rows, :, pos] = qkv[:, :, :, 1]  # advanced indices first: (B, T, m, H, hd)
        v_all[:, rows, :, pos] = qkv[:, :, :, 2]
        states = heads.finish(h, qkv, k_all, v_all, lengths + last, last)  # (m, B, D)
        return next_ids, last, self._argmax(states).T


def graphed(fn, *inputs: torch.Tensor):
    """`fn(*inputs)` as a CUDA graph on a CUDA device: warmed up twice on a side stream, captured once, then
    each call copies its arguments into the captured input buffers and replays (the outputs are the
    captured buffers: read them before the next call). On a CPU, `fn` itself. The warm-up and the capture
    run `fn` on these very inputs (its cache writes are the ones the first call makes anyway)."""
    dev = inputs[0].device
    if dev.type != "cuda":
        return fn
    # Streams, capture and replay belong to the current device: make it the inputs' one (--device cuda:1).
    # thread_local: another thread's CUDA calls (the training loader's pin-memory thread, while the trainer's
    # generation eval captures) neither break this capture nor are broken by it.
    with torch.cuda.device(dev):
        static = [x.clone() for x in inputs]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*static)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn(*static)

    def replay(*args: torch.Tensor):
        with torch.cuda.device(dev):
            for buf, x in zip(static, args):
                buf.copy_(x)
            graph.replay()
        return outputs

    replay.fn = fn  # what the graph reads (the steps' stacked head weights) lives as long as the replay
    return replay
