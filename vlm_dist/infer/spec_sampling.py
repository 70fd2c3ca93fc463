"""Speculative sampling drafted by the multi-token heads: samples from exactly the model's own distribution
(temperature, top-p), with fewer model calls than one per token.

    rows, stats = speculative_sample_batch(model, images, prompts, max_new_tokens=32, temperature=0.8,
                                           generator=torch.Generator().manual_seed(0))

The rule is Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et
al. 2023, with the model's extra heads as the draft model (Gloeckle et al. 2024 use them greedily). Each call
feeds every row a draft of n = n_future tokens: x0, sampled from head 0's distribution p (exact: it is the
model's next token), and x1..x(n-1), sampled from the extra heads' distributions q1..q(n-1) at the same
position (head k guesses the token k+1 places on; the same temperature and top-p). One cached forward gives
p after every draft token. Draft token x(i+1) is kept with probability min(1, p_i(x(i+1)) / q(i+1)(x(i+1))),
while every earlier one was kept; the first one refused is replaced by a sample from the residual
max(0, p_i - q(i+1)), normalised; when all are kept, the next token is sampled from p after the last. That
replacement (or bonus) token and the heads' new guesses make the next draft. Each emitted token is then
distributed as p given the tokens before it, whatever q is (the proposal only changes how often drafts are
kept): tests/test_spec_sampling.py checks the sequences' frequencies against the model's probabilities.

The heads draw from the unembedding's shortlist (the certified argmax's columns, 256 on the demo model) rather
than the whole vocabulary: any proposal keeps the output exact, and a shortlist's q spares each call m
full-vocabulary rows. p cannot be cut so: every call still unembeds the whole vocabulary at its n positions,
where greedy drafts need only certified argmaxes (docs/bench/issue9_round11.md measures what this costs).

Rows keep different numbers of tokens per call; the cache is ragged and finished rows leave the batch, as in
greedy speculative decoding (infer/speculative.py), whose bookkeeping this shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_dist.infer.generate import decoding, sample, sampling_probs, uniform
from vlm_dist.infer.speculative import emit, finish_stats, padded_prompts
from vlm_dist.text import get_tokenizer


def accept(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, cols: torch.Tensor, picks: torch.Tensor | None,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule for a batch of drafts. draft (B, n): x0..x(n-1); p (B, n, V): the model's
    distribution after each draft token; q (B, n-1, K): the distribution each of x1..x(n-1) was drawn from, over
    the vocabulary's columns `cols` (K,) (0 elsewhere), and picks (B, n-1): where in `cols` each draft token is
    (draft[:, 1:] == cols[picks]); q and picks are None when n = 1.
    Returns (last (B,): the last kept draft position, 0..n-1; next (B,): the token after it, drawn from the
    residual of the first refused position, or from p after x(n-1) when all were kept)."""
    B, n = draft.shape
    rows = torch.arange(B, device=p.device)
    if n > 1:
        p_tok = p[:, :-1].gather(2, draft[:, 1:, None]).squeeze(2)  # (B, n-1): p_i(x(i+1))
        q_tok = q.gather(2, picks[:, :, None]).squeeze(2)  # q(i+1)(x(i+1)) > 0: x(i+1) was drawn from it
        u = uniform(p_tok.shape, generator, p.device)
        kept = u * q_tok < p_tok  # u < p / q without a division
        last = kept.long().cumprod(dim=1).sum(dim=1)  # (B,)
    else:
        last = torch.zeros(B, dtype=torch.long, device=p.device)
    after = p[rows, last]  # (B, V): p after the last kept token
    residual = after.clone()
    if n > 1:  # minus the refused proposal (none when all were kept)
        residual[:, cols] -= q[rows, last.clamp_max(n - 2)] * (last < n - 1)[:, None]  # (B, K)
    residual = residual.clamp_min(0)
    mass = residual.sum(dim=1, keepdim=True)
    # p == q to the last bit leaves no residual, but then the draft is never refused; guard rounding anyway
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), after)
    return last, sample(residual, generator)


@torch.no_grad()
def speculative_sample_batch(model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 32,
                             temperature: float = 1.0, top_p: float = 1.0,
                             generator: torch.Generator | None = None) -> tuple[list[list[int]], dict]:
    """Sample a continuation of each row's prompt (B images (B, 3, H, W), B prompts of ids starting with <sot>)
    from the model's distribution at `temperature` (> 0) and `top_p`, drafted by the extra heads. Returns the
    ids per row (without the end token) and the stats of speculative_generate_batch (tokens per call, the
    fraction of row-calls that kept draft position i)."""
    if temperature <= 0:
        raise ValueError("speculative sampling needs temperature > 0; temperature 0 is greedy decoding "
                         "(speculative_generate_batch, whose output is exactly greedy's)")
    tok = get_tokenizer()
    B, n, P = images.shape[0], model.cfg.n_future, model.n_image_tokens
    device = next(model.parameters()).device
    ids = padded_prompts(model, prompts, B, max_new_tokens, device)
    images = images.to(device, model.projector.weight.dtype)

    def dist(states: torch.Tensor) -> torch.Tensor:  # normalised states (..., D) -> sampling distribution (..., V)
        return sampling_probs(model.lm_head(states), temperature, top_p)

    with decoding(model):
        heads = model.fused_heads() if n > 1 else None
        # The heads draw their guesses from the unembedding's shortlist only (the certified argmax's, model/argmax.py:
        # the tokens the model uses): any proposal keeps the output exact, and one over K columns instead of V
        # spares each call m full-vocabulary rows (K = 256 of 49,408 on the demo model).
        cols = model.argmax_table().ids  # (K,), sorted
        w_cols = model.lm_head.weight.index_select(0, cols)  # (K, D)

        def draft_from(h: torch.Tensor, cache, at: torch.Tensor, first: torch.Tensor):
            """The next draft (B, n): `first`, then the heads' samples at fed position `at` (B,) of h (B, S, D);
            their distributions over `cols` (B, n-1, K) and where in `cols` each guess is (B, n-1) (both None
            without heads); advances the cache by S (the heads wrote their keys)."""
            if heads is None:
                cache.advance(h.shape[1])
                return first[:, None], None, None
            states = heads(h, cache, model.cfg.n_layers, at).transpose(0, 1)  # (B, n-1, D)
            q = sampling_probs(F.linear(states, w_cols), temperature, top_p)  # (B, n-1, K)
            cache.advance(h.shape[1])
            picks = sample(q, generator)
            return torch.cat([first[:, None], cols[picks]], dim=1), q, picks

        # the padded prompts (padded_prompts), with n spare cache slots as in greedy speculative decoding
        cache = model.new_cache(B, max_len=model.cfg.max_seq_len + n)
        h = model.fed_states(ids, cache, images)  # (B, P + longest, D)
        at = torch.tensor([P + len(p) - 1 for p in prompts], device=device)
        first = sample(dist(model.norm(h[torch.arange(B, device=device), at])), generator)
        draft, q, picks = draft_from(h, cache, at, first)
        cache.set_lengths([P + len(p) for p in prompts])

        out: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))
        calls = row_calls = 0
        accepted_at = [0] * n
        while live:
            base = cache.lengths
            h = model.fed_states(draft, cache)  # (b, n, D)
            last, nxt = accept(draft, dist(model.norm(h)), q, cols, picks, generator)
            next_draft, next_q, next_picks = draft_from(h, cache, last, nxt)
            calls += 1
            row_calls += len(live)
            host = torch.cat([last[:, None], draft], dim=1).tolist()  # one host sync per call
            keep = [r for r, b in enumerate(live) if not emit(out[b], host[r][1:], host[r][0] + 1, accepted_at,
                                                               tok.eos_id, max_new_tokens)]
            cache.crop([l + hr[0] + 1 for l, hr in zip(base, host)])  # forget refused positions
            draft, q, picks = next_draft, next_q, next_picks
            if len(keep) < len(live):  # finished rows leave the batch
                live = [live[r] for r in keep]
                if keep and q is not None:
                    q, picks = q[keep], picks[keep]
                if keep:
                    cache.keep_rows(keep)
                    draft = draft[keep]
    return out, finish_stats(out, calls, row_calls, accepted_at)
