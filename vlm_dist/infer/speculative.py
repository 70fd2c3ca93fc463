"""Self-speculative greedy decoding with the multi-token heads (Stern et al. 2018, "Blockwise
Parallel Decoding"; Gloeckle et al. 2024, section 3.2), batched over rows that accept different amounts.

    ids, stats = speculative_generate(model, image, prompt, max_new_tokens=32)          # one image
    rows, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=32)  # a batch

Each call feeds every row a draft of n = n_future tokens: head 0's greedy next token (exact) and the
extra heads' guesses for the tokens after it. One cached forward verifies all drafts: draft token i+1
is accepted while it equals head 0's argmax after draft token i. Each row keeps its accepted prefix
(at least one token), its cache is cropped back to it (rows hold different lengths: a ragged cache),
and the heads' states at its last accepted position give its next draft. The acceptance rule is exact
greedy, so the output is greedy decoding's, token for token (up to floating-point reassociation across
matmul shapes, which the tests check does not flip an argmax on their models).

What a call costs (the profile in docs/bench/issue9.md): at the demo size the 49,408-way unembedding,
not the trunk, sets the price. So head 0's argmax runs as ONE matmul over all B x n draft positions
(`VLM.greedy_ids`), and the draft heads, whose guesses need not be exact (a wrong one is only
rejected), score only the `draft_vocab` most frequent BPE tokens (open_clip's BPE ids are in merge
order, roughly frequency order; FR-Spec, Zhao et al. 2025) plus the end token.
"""

from __future__ import annotations

import torch

from vlm_dist.model.vlm import unembed_argmax
from vlm_dist.text import get_tokenizer

DRAFT_VOCAB = 16384  # draft heads score ids < this (+ the end token); covers every word of the demo captions


def draft_table(model, size: int = DRAFT_VOCAB) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unembedding rows the draft heads score, (K, D), and their token ids (None: the full vocabulary)."""
    W = model.lm_head.weight
    if size >= W.shape[0] - 1:
        return W, None
    ids = torch.cat([torch.arange(size), torch.tensor([get_tokenizer().eos_id])]).to(W.device)
    return W.index_select(0, ids), ids


def _draft_ids(states: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Draft heads' guesses: states (k, B, D) -> ids (B, k) (argmax over the draft table only)."""
    W, ids = table
    k, B, D = states.shape
    if k == 0:
        return torch.zeros(B, 0, dtype=torch.long, device=states.device)
    best = unembed_argmax(states.reshape(k * B, D), W).view(k, B)
    return (best if ids is None else ids[best]).T


@torch.no_grad()
def speculative_generate_batch(model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 32,
                               draft_vocab: int = DRAFT_VOCAB) -> tuple[list[list[int]], dict]:
    """images (B, 3, H, W); B prompts (ids starting with <sot>, lengths may differ). Returns the generated
    ids per row (without the end token) and stats: `calls` (batched model calls after the prompt),
    `row_calls` (calls summed over the rows still decoding), `tokens` (emitted: the end token and tokens
    past max_new_tokens are not counted), `tokens_per_call` = tokens / row_calls, and
    `accepted_per_position` (n_future,): the fraction of row-calls whose draft token i was accepted."""
    tok = get_tokenizer()
    B, n, P = images.shape[0], model.cfg.n_future, model.n_image_tokens
    if len(prompts) != B or any(not p for p in prompts):
        raise ValueError(f"need one non-empty prompt per image: {B} images, {len(prompts)} prompts")
    longest = max(len(p) for p in prompts)
    if P + longest + max_new_tokens > model.cfg.max_seq_len:  # the same limit as greedy decoding
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceed "
                         f"model.max_seq_len={model.cfg.max_seq_len} - {P} image tokens; lower --max-new-tokens")
    device = next(model.parameters()).device
    images = images.to(device, model.projector.weight.dtype)
    was_training = model.training
    model.eval()
    table = draft_table(model, draft_vocab)
    rows = torch.arange(B, device=device)

    # Prefill every row's prompt, padded to the longest: causal attention keeps row b's first len(p)
    # positions exact; the padding beyond them is hidden and overwritten once lengths are per row.
    ids = torch.full((B, longest), tok.pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
    # n spare cache slots: a call near the end of the context writes drafts past max_seq_len. Every token
    # it emits is still predicted from a position < max_seq_len (the check above); the rest are cut.
    cache = model.new_cache(B, max_len=model.cfg.max_seq_len + n)
    states = model.step_states(ids, cache, images=images)  # per head (B, longest, D)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    cache.set_lengths([P + len(p) for p in prompts])
    at = torch.stack([s[rows, last] for s in states])  # (n, B, D): heads at each row's last prompt position
    draft = torch.cat([model.greedy_ids(at[0])[:, None], _draft_ids(at[1:], table)], dim=1)  # (B, n)

    out: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # the original row of each row still in the batch
    calls = row_calls = 0
    accepted_at = [0] * n
    while live:
        base = list(cache.lengths)
        states = model.step_states(draft, cache)  # per head (b, n, D); every row's cache grew by n
        calls += 1
        row_calls += len(live)
        greedy = model.greedy_ids(states[0])  # (b, n): head 0's exact choice after each draft token
        match = (draft[:, 1:] == greedy[:, :-1]).long()  # (b, n-1)
        accepted = 1 + match.cumprod(dim=1).sum(dim=1)  # (b,) in 1..n: the longest matching prefix
        idx = accepted - 1  # each row's last accepted position in this call
        at = torch.stack([s[rows, idx] for s in states[1:]]) if n > 1 else states[0][:, :0].transpose(0, 1)  # (n-1, b, D)
        next_draft = torch.cat([greedy[rows, idx][:, None], _draft_ids(at, table)], dim=1)  # (b, n)

        acc, tokens, keep = accepted.tolist(), draft.tolist(), []
        for r, b in enumerate(live):
            for i in range(acc[r]):
                accepted_at[i] += 1
            finished = False
            for t in tokens[r][: acc[r]]:
                if t == tok.eos_id:
                    finished = True
                    break
                out[b].append(t)
                if len(out[b]) >= max_new_tokens:
                    finished = True
                    break
            if not finished:
                keep.append(r)
        cache.crop([l + a for l, a in zip(base, acc)])  # forget rejected positions (causal: the rest stands)
        draft = next_draft
        if len(keep) < len(live):  # finished rows leave the batch: later calls do not compute them
            live = [live[r] for r in keep]
            if keep:
                cache.keep_rows(keep)
                draft = draft[keep]
                rows = rows[: len(keep)]
    model.train(was_training)
    emitted = sum(map(len, out))
    return out, {"calls": calls, "row_calls": row_calls, "tokens": emitted,
                 "tokens_per_call": emitted / max(row_calls, 1),
                 "accepted_per_position": [a / max(row_calls, 1) for a in accepted_at]}


def speculative_generate(model, image: torch.Tensor, prompt: list[int], max_new_tokens: int = 32,
                         draft_vocab: int = DRAFT_VOCAB) -> tuple[list[int], dict]:
    """One image (1, 3, H, W) or (3, H, W) and its prompt: `speculative_generate_batch` with B = 1."""
    if image.dim() == 3:
        image = image[None]
    ids, stats = speculative_generate_batch(model, image, [prompt], max_new_tokens, draft_vocab)
    return ids[0], stats


def merge_stats(parts: list[dict]) -> dict:
    """Stats of several `speculative_generate_batch` calls as one (sums; rates weighted by row-calls)."""
    row_calls = sum(p["row_calls"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    n = len(parts[0]["accepted_per_position"])
    accepted = [sum(p["accepted_per_position"][i] * p["row_calls"] for p in parts) for i in range(n)]
    return {"calls": sum(p["calls"] for p in parts), "row_calls": row_calls, "tokens": tokens,
            "tokens_per_call": tokens / max(row_calls, 1), "accepted_per_position": [a / max(row_calls, 1) for a in accepted]}


def format_stats(stats: dict, seconds: float | None = None) -> str:
    """One line: tokens per call, acceptance per draft position, and tokens/s when `seconds` is given."""
    acc = " ".join(f"{a:.0%}" for a in stats["accepted_per_position"])
    line = (f"speculative decoding: {stats['tokens_per_call']:.2f} tokens per model call per row "
            f"({stats['tokens']} tokens, {stats['calls']} batched calls); accepted per draft position: {acc}")
    return line + (f"; {stats['tokens'] / seconds:.0f} tokens/s" if seconds else "")
