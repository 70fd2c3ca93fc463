"""Batched, KV-cached decoding: greedy (temperature 0) or sampling (temperature, top-p).

    texts = generate_text(model, images, questions=[None, "what colour is the circle?"])

Rows may have prompts of different lengths (captions start from <sot>, questions from the Q&A
prompt). All rows share the image prefix and start text at the same position, so instead of padding
we feed each row its own prompt token while it is still inside its prompt (teacher forcing) and its
own sampled token after; one batched cache serves all rows and no attention mask is needed.
"""

from __future__ import annotations

import contextlib

import torch

from vlm_dist.infer.shortlist_sampling import sample_states
from vlm_dist.infer.static import StaticSteps, graphed, session, static_default
from vlm_dist.text import get_tokenizer, prompt_tokens


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (..., V) -> the distribution that sampling draws from (..., V), in fp32 and normalised:
    softmax(logits / temperature), cut to the smallest set of tokens with mass >= top_p and renormalised."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (..., V) with every token outside its row's nucleus (the smallest set of mass >= top_p, largest
    first) set to 0; not renormalised. Sorts only each row's candidates where it can (cut_rows)."""
    V = probs.shape[-1]
    flat = probs.reshape(-1, V)
    # tokens of probability <= (1 - top_p) / (2V) hold at most half of the mass a nucleus leaves out: the rest,
    # a trained model's few dozen, are enough candidates (a flat row, after an unlikely token, has thousands)
    counts = (flat > (1 - top_p) / (2 * V)).sum(dim=1)  # (N,)
    few = counts <= V // 8
    if bool(few.all()):  # the usual case (host syncs: here, the max, and cut_rows' check)
        return cut_rows(flat, top_p, int(counts.max())).view_as(probs)
    out = torch.empty_like(flat)
    for rows, k in ((few, int(counts[few].max()) if bool(few.any()) else 0), (~few, V)):
        idx = rows.nonzero().squeeze(1)
        if idx.numel():
            out[idx] = cut_rows(flat[idx], top_p, k)
    return out.view_as(probs)


def cut_rows(probs: torch.Tensor, top_p: float, k: int) -> torch.Tensor:
    """`nucleus` of rows probs (N, V) from each row's k largest probabilities (all V: a full sort).

    A full sort of V = 49,408 columns costs more per row than a decoding step of the demo model; the k largest
    far less (docs/bench/issue9_round12.md). On a CPU the cumulative sums of the k largest are the full sort's
    first k, to the bit (the same values in the same order, summed in sequence), so the check is exact: the full
    sort's token k (the first left out) is outside the nucleus iff the mass before it exceeds top_p; where that
    fails for a row (rounding next to top_p = 1), the rows take the full sort."""
    V = probs.shape[-1]
    if 0 < k < V:
        sorted_p, order = probs.topk(k, dim=-1)  # sorted, descending
        if not bool((sorted_p.cumsum(dim=-1)[:, -1] > top_p).all()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest set with mass >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0.0))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from each row of probs (..., V) (non-negative, any positive sum) -> ids (...): one uniform
    number per row against the cumulative sum, in float64 (torch.multinomial draws V exponentials per row
    on a CPU, which at V = 49,408 cost more than the rest of a sampling step). A token of probability 0 is
    never drawn."""
    cdf = probs.reshape(-1, probs.shape[-1]).cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # torch.multinomial refused these too
        raise ValueError("sampling from probabilities that are NaN, infinite or all zero: the model's logits are "
                         "not finite (check its weights, or decode in fp32)")
    u = uniform(total.shape, generator, cdf.device, torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total, also after rounding
    return torch.searchsorted(cdf, u, right=True).view(probs.shape[:-1])  # the first token whose sum passes u


def uniform(shape: tuple, generator: torch.Generator | None, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.rand(shape) on `device`, drawn where the generator lives and then moved: the CLI's generator is a
    CPU one, also for a GPU decode, and torch.rand refuses a generator of another device."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, dtype=dtype, device=where, generator=generator).to(device)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return sample(sampling_probs(logits, temperature, top_p), generator)


@contextlib.contextmanager
def decoding(model):
    """`with decoding(model): ...` runs a decode in eval mode and hands the model back in the mode it came
    in, also when the decode raises. A model in training first drops its decode caches
    (VLM.drop_decode_caches): ZeRO's optimizer writes the weights through .data, which bumps no version;
    and it keeps nothing the decode made once it trains again: no static decoding session (infer/static.py),
    no packed copy of the weights (model/packed.py).
    eval() walks every module (~1 ms with the vision tower), so it runs only when the model was training."""
    was_training = model.training
    if was_training:
        model.drop_decode_caches()
        model.eval()
    try:
        yield
    finally:
        if was_training:  # no static session's KV cache and graph stays on the GPU, no packed weight copy, while training
            model.drop_decode_caches()
            model.train()


@torch.no_grad()
def generate(model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, use_cache: bool = True,
             generator: torch.Generator | None = None, static: bool | None = None) -> list[list[int]]:
    """Continue each row's prompt; return the generated ids per row (without the end token).

    images (B, 3, H, W) in the model's input transform; prompts: B lists of token ids, each starting
    with <sot>. use_cache=False recomputes the whole sequence every step (the reference for tests).
    static=True (greedy only): the steps after the prefill run as fixed-shape steps (infer/static.py: a
    CUDA graph on a GPU); None (the default): so on a GPU when decoding greedily from the cache, not on a CPU.
    """
    tok = get_tokenizer()
    B = images.shape[0]
    if len(prompts) != B or any(not p for p in prompts):
        raise ValueError(f"need one non-empty prompt per image: {B} images, {len(prompts)} prompts")
    if static and (temperature > 0 or not use_cache):
        raise ValueError("static=True decodes greedily from the KV cache: temperature 0 and use_cache=True only")
    device = next(model.parameters()).device
    if static is None:
        static = use_cache and temperature <= 0 and static_default(device)
    dtype = model.projector.weight.dtype
    images = images.to(device, dtype)
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens  # text positions the longest row may need
    if model.n_image_tokens + total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} text tokens exceed model.max_seq_len="
                         f"{model.cfg.max_seq_len} - {model.n_image_tokens} image tokens; lower --max-new-tokens")
    seq = torch.full((B, total), tok.pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seq[b, : len(p)] = torch.tensor(p, device=device)
    start = min(lengths)  # every row is still inside its prompt up to here: prefill it at once
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ends = torch.tensor([l + max_new_tokens for l in lengths], device=device)
    in_prompt_len = torch.tensor(lengths, device=device)
    with decoding(model):
        if static:  # a cache whose step an earlier decode of this shape may have captured already
            sess = session(model, "greedy", B, model.cfg.max_seq_len)
            cache, run = sess.cache, sess.run
        else:
            cache, run = (model.new_cache(B) if use_cache else None), None
        pos = start
        greedy = temperature <= 0
        dev_lengths = None

        def cached_next(ids: torch.Tensor) -> torch.Tensor:
            """Feed ids (B, T); greedy: the next ids (B,) as one exact argmax matmul (VLM.greedy_ids), without
            the (B, V) logits; sampling: the last position's final states (B, D)."""
            nonlocal run, dev_lengths
            if static and cache.lengths[0] > 0:  # after the prefill: one fixed-shape step (every row at one length)
                if dev_lengths is None:
                    dev_lengths = torch.full((B,), cache.lengths[0], device=device)
                if run is None:
                    run = sess.run = graphed(StaticSteps(model, cache).greedy, ids, dev_lengths)
                nxt = run(ids, dev_lengths)
                cache.advance(1)
                dev_lengths.add_(1)
                return nxt
            states = model.step_states(ids, cache, images=images if cache.lengths[0] == 0 else None, next_token_only=True)
            return model.greedy_ids(states[0][:, -1]) if greedy else states[0][:, -1]

        scores = cached_next(seq[:, :start]) if use_cache else None  # next ids (greedy) or final states (B, D)
        while pos < total and not done.all():
            if not use_cache:
                logits = model(images, seq[:, :pos])["logits"][:, 0, -1]  # (B, V), full recompute
                scores = logits.argmax(dim=-1) if greedy else logits
            if greedy:
                nxt = scores
            elif use_cache:  # exact, and on a CPU mostly without the (B, V) logits (infer/shortlist_sampling.py)
                nxt = sample_states(model, scores, temperature, top_p, generator)
            else:
                nxt = _pick(scores, temperature, top_p, generator)
            generating = pos >= in_prompt_len  # rows past their prompt take the model's token
            nxt = torch.where(generating & ~done, nxt, seq[:, pos])
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
            seq[:, pos] = nxt
            done |= generating & ((nxt == tok.eos_id) | (pos + 1 >= ends))
            pos += 1
            if use_cache and pos < total and not done.all():
                scores = cached_next(seq[:, pos - 1 : pos])
    out = []
    for b, p in enumerate(prompts):
        ids = seq[b, len(p) : ends[b]].tolist()
        out.append(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
    return out


def generate_text(model, images: torch.Tensor, questions: list[str | None], **kw) -> list[str]:
    """Captions (question None) or answers, decoded to text."""
    tok = get_tokenizer()
    ids = generate(model, images, [prompt_tokens(tok, q) for q in questions], **kw)
    return [tok.decode(i) for i in ids]


def fit_max_new_tokens(cfg, prompt_len: int, requested: int) -> tuple[int, str | None]:
    """`requested` lowered to what the context holds after the image tokens and the prompt (the same for
    greedy and self-speculative decoding); returns (tokens, a note if lowered). `cfg` is the
    ModelConfig, so this is checked without building the model."""
    room = cfg.max_seq_len - cfg.n_image_tokens - prompt_len
    what = f"{cfg.n_image_tokens} image tokens + a {prompt_len}-token prompt"
    if room < 1:
        raise ValueError(f"model.max_seq_len={cfg.max_seq_len} leaves no room to generate after {what}; "
                         f"shorten the question")
    if requested <= room:
        return requested, None
    return room, (f"note: max new tokens {requested} lowered to {room}: the model's context "
                  f"(max_seq_len={cfg.max_seq_len}) holds {what} + {room} new tokens")
