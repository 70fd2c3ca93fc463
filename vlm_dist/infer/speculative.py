"""Self-speculative greedy decoding with the multi-token heads (Stern et al. 2018, "Blockwise
Parallel Decoding"; Gloeckle et al. 2024, section 3.2).

    ids, stats = speculative_generate(model, image, prompt, max_new_tokens=32)

At each step the heads' predictions at the last accepted position form a draft of n_future tokens
(head 0's is the greedy next token itself). One cached forward over the draft verifies it: draft
token i+1 is accepted while it equals head 0's greedy choice after draft token i. The accepted
prefix (at least one token) is kept, the cache is cropped back to it, and the heads' logits at the
last accepted position give the next draft. The output is exactly greedy decoding's; what changes is
the number of model calls (stats["tokens_per_call"]). Rows differ in how much they accept, so a batch
is decoded row by row.
"""

from __future__ import annotations

import torch

from vlm_dist.text import get_tokenizer


@torch.no_grad()
def speculative_generate(model, image: torch.Tensor, prompt: list[int], max_new_tokens: int = 32) -> tuple[list[int], dict]:
    """image (1, 3, H, W) or (3, H, W); prompt ids starting with <sot>. Returns (generated ids without
    the end token, {"calls": model calls after the prompt, "tokens_per_call": mean accepted tokens})."""
    if image.dim() == 3:
        image = image[None]
    tok = get_tokenizer()
    n = model.cfg.n_future
    if model.n_image_tokens + len(prompt) + max_new_tokens + n > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + draft ({n}) exceed "
                         f"model.max_seq_len={model.cfg.max_seq_len} - {model.n_image_tokens} image tokens")
    device = next(model.parameters()).device
    image = image.to(device, model.projector.weight.dtype)
    was_training = model.training
    model.eval()
    cache = model.new_cache(1)
    ids = torch.tensor([prompt], device=device)
    logits = model.step(ids, cache, images=image)[0, :, -1]  # (n_future, V): heads at the last prompt position
    out: list[int] = []
    calls = 0
    while len(out) < max_new_tokens:
        draft = logits.argmax(dim=-1)  # (n_future,): t+1 (greedy), t+2, ... t+n
        base = cache.length
        states = model.step_states(draft[None], cache)  # per head (1, n draft positions, D)
        calls += 1
        greedy_next = model.lm_head(states[0][0]).argmax(dim=-1)  # head 0 after each draft token: (n,)
        accepted = 1
        while accepted < n and draft[accepted] == greedy_next[accepted - 1]:
            accepted += 1
        new = draft[:accepted].tolist()
        cache.crop(base + accepted)  # forget the rejected draft positions (causal: the rest is unaffected)
        # all heads at the last accepted position only: n + (n - 1) unembeddings per call, not n * n
        logits = model.lm_head(torch.stack([s[0, accepted - 1] for s in states]))  # (n_future, V)
        for t in new:
            if t == tok.eos_id or len(out) >= max_new_tokens:
                model.train(was_training)
                return out, {"calls": calls, "tokens_per_call": (len(out) + 1) / calls}
            out.append(t)
    model.train(was_training)
    return out, {"calls": calls, "tokens_per_call": len(out) / max(calls, 1)}
