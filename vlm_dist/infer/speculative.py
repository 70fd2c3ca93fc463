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

What a call costs (the profiles in docs/bench/issue9.md and docs/bench/issue9_round3.md): one
`VLM.verify_step` per call. Every argmax over the 49,408-token vocabulary (head 0's after each draft
token, the draft heads' guesses) comes from a shortlist's logits and a Cauchy-Schwarz certificate
(model/argmax.py: the full matmul only for rows it does not certify, none on the trained demo model);
the extra heads run stacked (heads.FusedHeads) and their attention and MLP only at each row's last
accepted position; the blocks decode through F.* calls rather than nn.Module calls.
"""

from __future__ import annotations

import torch

from vlm_dist.infer.generate import decoding
from vlm_dist.infer.static import StaticSteps, graphed, session, static_default
from vlm_dist.text import get_tokenizer

@torch.no_grad()
def speculative_generate_batch(model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 32,
                               static: bool | None = None) -> tuple[list[list[int]], dict]:
    """images (B, 3, H, W); B prompts (ids starting with <sot>, lengths may differ). Returns the generated
    ids per row (without the end token) and stats: `calls` (batched model calls after the prompt),
    `row_calls` (calls summed over the rows still decoding), `tokens` (emitted: the end token and tokens
    past max_new_tokens are not counted), `tokens_per_call` = tokens / row_calls, and
    `accepted_per_position` (n_future,): the fraction of row-calls whose draft token i was accepted.
    static=True: the verify calls run as fixed-shape steps (infer/static.py: a CUDA graph on a GPU); finished
    rows then stay in the batch, uncounted, instead of leaving it. None (the default): static on a GPU, not on a CPU."""
    tok = get_tokenizer()
    B, n, P = images.shape[0], model.cfg.n_future, model.n_image_tokens
    device = next(model.parameters()).device
    ids = padded_prompts(model, prompts, B, max_new_tokens, device)
    static = static_default(device) if static is None else static
    images = images.to(device, model.projector.weight.dtype)
    with decoding(model):
        # n spare cache slots: a call near the end of the context writes drafts past max_seq_len. Every token
        # it emits is still predicted from a position < max_seq_len (the check above); the rest are cut.
        sess = session(model, "verify", B, model.cfg.max_seq_len + n) if static else None
        cache = sess.cache if static else model.new_cache(B, max_len=model.cfg.max_seq_len + n)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        heads = model.fused_heads()  # the draft heads stacked, for this decode
        nxt, _, guesses = model.verify_step(ids, cache, images=images, last=last, heads=heads)
        cache.set_lengths([P + len(p) for p in prompts])
        draft = torch.cat([nxt[:, None], guesses], dim=1)  # (B, n): the next token + the heads' guesses

        out: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))  # the original row of each row still in the batch
        calls = row_calls = 0
        accepted_at = [0] * n
        run, lengths, active = (sess.run if static else None), None, None
        while live:
            base = cache.lengths
            if static:  # the whole batch every call; finished rows' lengths stay put
                if lengths is None:
                    lengths = torch.tensor(base, device=device)
                    active = torch.ones(B, dtype=torch.long, device=device)  # rows still decoding
                if run is None:
                    run = sess.run = graphed(StaticSteps(model, cache).verify, draft, lengths)
                nxt, at, guesses = run(draft, lengths)
                cache.advance(n)
            else:
                nxt, at, guesses = model.verify_step(draft, cache, heads=heads)  # every row's cache grew by n
            calls += 1
            row_calls += len(live)
            # one host sync per call: each row's accepted count (at + 1) and its draft tokens
            host = torch.cat([at[:, None], draft], dim=1).tolist()  # [last accepted position, draft...] per row
            next_draft = torch.cat([nxt[:, None], guesses], dim=1)  # (b, n)
            rows = ((b, b) for b in live) if static else enumerate(live)  # static: row r of the batch is b
            keep = [r for r, b in rows if not emit(out[b], host[r][1:], host[r][0] + 1, accepted_at, tok.eos_id,
                                                   max_new_tokens)]
            if static:
                still = set(keep)
                cache.crop([l + (h[0] + 1 if b in still else 0) for b, (l, h) in enumerate(zip(base, host))])
                if len(keep) < len(live):  # a row finished: its length stays put from now on (a copy to the device)
                    active.copy_(torch.tensor([b in still for b in range(B)]))
                lengths.add_((at + 1) * active)  # on the device, as cache.crop did on the host
                live, draft = keep, next_draft
                continue
            cache.crop([l + h[0] + 1 for l, h in zip(base, host)])  # forget rejected positions (causal: the rest stands)
            draft = next_draft
            if len(keep) < len(live):  # finished rows leave the batch: later calls do not compute them
                live = [live[r] for r in keep]
                if keep:
                    cache.keep_rows(keep)
                    draft = draft[keep]
    return out, finish_stats(out, calls, row_calls, accepted_at)


def padded_prompts(model, prompts: list[list[int]], batch: int, max_new_tokens: int, device: torch.device) -> torch.Tensor:
    """The prompts (ids starting with <sot>, one per image, lengths may differ) as one (B, longest) prefill,
    padded: causal attention keeps row b's first len(p) positions exact, and the padding beyond them is hidden
    and overwritten once the cache's lengths are per row. Refuses prompts + max_new_tokens the context cannot
    hold (the same limit as greedy decoding)."""
    if len(prompts) != batch or any(not p for p in prompts):
        raise ValueError(f"need one non-empty prompt per image: {batch} images, {len(prompts)} prompts")
    longest, P = max(len(p) for p in prompts), model.n_image_tokens
    if P + longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceed "
                         f"model.max_seq_len={model.cfg.max_seq_len} - {P} image tokens; lower --max-new-tokens")
    ids = torch.full((batch, longest), get_tokenizer().pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
    return ids


def emit(row: list[int], draft: list[int], accepted: int, accepted_at: list[int], eos: int, max_new_tokens: int) -> bool:
    """Append a row's first `accepted` draft tokens to its output `row` up to the end token or max_new_tokens
    (neither is emitted past), counting each accepted draft position in accepted_at; True when the row is done."""
    for i in range(accepted):
        accepted_at[i] += 1
    for t in draft[:accepted]:
        if t == eos or len(row) >= max_new_tokens:  # the limit first: max_new_tokens 0 emits nothing
            return True
        row.append(t)
        if len(row) >= max_new_tokens:
            return True
    return False


def finish_stats(out: list[list[int]], calls: int, row_calls: int, accepted_at: list[int]) -> dict:
    """A speculative decode's stats (see speculative_generate_batch)."""
    emitted = sum(map(len, out))
    return {"calls": calls, "row_calls": row_calls, "tokens": emitted, "tokens_per_call": emitted / max(row_calls, 1),
            "accepted_per_position": [a / max(row_calls, 1) for a in accepted_at]}


def speculative_generate(model, image: torch.Tensor, prompt: list[int], max_new_tokens: int = 32) -> tuple[list[int], dict]:
    """One image (1, 3, H, W) or (3, H, W), or its tower tokens (1, P, W) or (P, W) (precompute-features), and
    its prompt: `speculative_generate_batch` with B = 1."""
    if image.dim() == 2 or image.dim() == 3 and image.shape[0] != 1:  # no batch dimension yet
        image = image[None]
    ids, stats = speculative_generate_batch(model, image, [prompt], max_new_tokens)
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
