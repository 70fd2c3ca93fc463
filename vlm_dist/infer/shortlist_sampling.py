"""Exact sampling from the softmax over the whole vocabulary, mostly without the whole vocabulary's logits.

    ids = sample_states(model, states, temperature=0.7, top_p=1.0, generator=g)   # states (N, D), normalised

Sampling needs every token's probability, and on a CPU the (V, D) unembedding of one row (V = 49,408) costs more
than the rest of a demo model's decoding step (2.5 ms against ~0.4 ms on an AVX2 core; docs/bench/issue9_round12.md).
Greedy decoding avoids it with the certified argmax (model/argmax.py): one (K+1, D) matmul gives the shortlist's K
logits l_i and a bound U >= every other token's logit, as the full matmul would compute it. Sampling can use the
same two numbers. With weights w_i = exp((l_i - m) / T) (m the best logit), each outside token weighs at most
b = exp((U - m) / T), so the outside mass B is at most B+ = (V - K) b. Then:

- top_p = 1: draw u uniform in [0, A + B+), A = sum of w_i. u < A picks shortlist token i by the cumulative sum
  (probability w_i / (A + B+)). Otherwise the full logits of that row are computed and u - A, uniform in [0, B+),
  picks outside token j by the outside tokens' cumulative sum (probability w_j / (A + B+)), or, past B, nothing:
  the row draws again. Every token's chance per round is its weight over A + B+, so the accepted draw is
  distributed as w / (A + B): the model's softmax, exactly. A new round is independent of the one refused, so it
  may use any exact sampler: the row's full logits, computed by then, draw it directly (a loose bound costs one
  full row, never a loop of rounds). On the demo model at temperature 0.7 the full logits are needed in ~0.2 % of
  draws.
- top_p < 1: the nucleus is the shortest prefix of the sorted probabilities whose mass reaches top_p Z, Z = A + B
  in [A, A + B+]. A shortlist prefix decides it without B when it is kept for every such Z (mass before its last
  token <= top_p A), the next token is out for every such Z (mass before it > top_p (A + B+)), and its last token
  outweighs b (so no outside token sorts inside it). Then the draw is from the prefix's own weights. A row that
  is not decided so takes the full logits and `sampling_probs`.

Exact up to float rounding, as the full path is (the shortlist's logits come from another matmul shape). The
rows need the full logits only when the certificate is loose; an untrained model's rows mostly are. CPU only:
on a GPU the full unembedding is cheap and the branches would cost host syncs; there `sample_states` is the full path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_states(model, states: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """states (N, D): normalised final states (what the LM head takes) -> sampled ids (N,), as
    sample(sampling_probs(model.lm_head(states), temperature, top_p), generator) would draw them."""
    from vlm_dist.infer.generate import sample, sampling_probs, uniform

    table = model.argmax_table()
    W = table.weight
    x = states if states.dtype == W.dtype else states.to(W.dtype)

    def full(rows: torch.Tensor) -> torch.Tensor:
        return sample(sampling_probs(F.linear(x[rows], W), temperature, top_p), generator)

    N = x.shape[0]
    everything = torch.arange(N, device=x.device)
    if x.device.type != "cpu" or table.radius == float("-inf"):  # a GPU, or a shortlist that is the vocabulary
        return full(everything)
    s = F.linear(x, table.table)  # (N, K+1): the shortlist's logits and x . centre
    logits = s[:, :-1].float()
    bound, usable = table.bound(x, s)  # (N,) >= every outside token's logit as the full matmul computes it
    m = logits.max(dim=1).values
    w = ((logits - m[:, None]) / temperature).double().exp()  # (N, K)
    b = ((bound - m) / temperature).double().exp()  # (N,): each outside token's weight is at most this
    V, K = W.shape[0], logits.shape[1]
    cdf_w = w.cumsum(dim=1)
    A, B_up = cdf_w[:, -1], (V - K) * b  # A: the shortlist's mass, as the cumulative sum that picks from it ends
    out = torch.empty(N, dtype=torch.long, device=x.device)
    if top_p < 1.0:
        return _nucleus(table, x, w, b, A, B_up, top_p, usable, out, full, generator)
    rows = everything[usable]
    if not bool(usable.all()):
        out[~usable] = full(everything[~usable])
    u = uniform((rows.numel(),), generator, x.device, torch.float64) * (A[rows] + B_up[rows])
    inside = u < A[rows]
    if bool(inside.any()):
        pick = torch.searchsorted(cdf_w[rows[inside]], u[inside, None], right=True).squeeze(1).clamp_max(K - 1)
        out[rows[inside]] = table.ids[pick]
    if bool(inside.all()):
        return out
    rows, v = rows[~inside], u[~inside] - A[rows[~inside]]  # v: uniform in [0, B_up) given this branch
    z = F.linear(x[rows], W).float()  # these rows' full logits
    weights = ((z - m[rows, None]) / temperature).double().exp()  # (n, V)
    weights[:, table.ids] = 0.0  # outside tokens only
    if bool((weights > b[rows, None]).any()):  # the certificate's bound is what makes the draw exact
        raise RuntimeError("an outside token's logit exceeds the certified bound: the shortlist table does not "
                           "match the weights (drop_decode_caches after writing them through .data)")
    cdf = weights.cumsum(dim=1)
    got = v < cdf[:, -1]  # else this round draws nothing (probability (B_up - B) / B_up)
    out[rows[got]] = torch.searchsorted(cdf[got], v[got, None], right=True).squeeze(1).clamp_max(V - 1)
    if not bool(got.all()):  # a new round, independent of this one: from the full logits now at hand, exactly
        out[rows[~got]] = sample(sampling_probs(z[~got], temperature, 1.0), generator)
    return out


def _nucleus(table, x, w, b, A, B_up, top_p, usable, out, full, generator) -> torch.Tensor:
    """top_p < 1 (module doc): rows whose nucleus the shortlist decides draw from it; the rest take `full`."""
    from vlm_dist.infer.generate import uniform

    sorted_w, order = w.sort(dim=1, descending=True)  # (N, K): K is small
    cum = sorted_w.cumsum(dim=1)
    before = cum - sorted_w  # mass before each position
    kept = before <= top_p * A[:, None]  # kept whatever B is (Z >= A)
    k = kept.sum(dim=1)  # (N,) the prefix kept for sure (a prefix: `before` grows)
    K = w.shape[1]
    nxt = k.clamp_max(K - 1)
    last = (k - 1).clamp_min(0)
    decided = (usable & (k >= 1) & (k < K)
               & (before.gather(1, nxt[:, None]).squeeze(1) > top_p * (A + B_up))  # the next one is out for every Z
               & (sorted_w.gather(1, last[:, None]).squeeze(1) > b))  # no outside token sorts inside the prefix
    rows = decided.nonzero().squeeze(1)
    if rows.numel():
        prefix = torch.arange(K, device=x.device)[None, :] < k[rows, None]
        cdf = (sorted_w[rows] * prefix).cumsum(dim=1)
        u = uniform((rows.numel(),), generator, x.device, torch.float64) * cum.gather(1, last[rows, None]).squeeze(1)
        pick = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_max(K - 1)
        out[rows] = table.ids[order[rows].gather(1, pick[:, None]).squeeze(1)]
    rest = (~decided).nonzero().squeeze(1)
    if rest.numel():
        out[rest] = full(rest)
    return out
