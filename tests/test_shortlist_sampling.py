"""Sampling from the certified argmax's shortlist (infer/shortlist_sampling.py) draws from the softmax over the whole
vocabulary: Monte-Carlo chi-square tests on a 60-token vocabulary whose outside tokens hold enough mass that the
outside branch and its rejections run often, with and without top-p (nuclei the shortlist decides and ones it
does not); a bound that does not hold is an error, not a biased draw. The end-to-end tests of `generate`, which
samples through it, are in tests/test_spec_sampling.py (chi-square against the model's sequence probabilities)."""

import torch
import torch.nn.functional as F

from vlm_dist.infer.generate import sampling_probs
from vlm_dist.infer.shortlist_sampling import sample_states
from vlm_dist.model.argmax import CertifiedArgmax

V, D, K, N = 60, 16, 8, 200_000


class Table:
    """What sample_states needs of a model: its argmax table."""

    def __init__(self, W):
        self.table = CertifiedArgmax(W, ids=torch.arange(K))

    def argmax_table(self):
        return self.table


def setup():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, D, generator=g) * 0.05
    W[:K] += torch.randn(K, D, generator=g)  # the shortlist: the rows far from the rest
    x = torch.randn(3, D, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * 4
    return Table(W), W, x


def chi_square_p(ids: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(ids, minlength=V).double()
    expected = probs.double() * ids.numel()
    assert bool((counts[expected == 0] == 0).all()), "drew a token of probability 0"
    if int((expected > 0).sum()) == 1:  # a one-token nucleus: every draw is that token (checked above)
        return 1.0
    cells = expected >= 5
    rest_c, rest_e = counts[~cells].sum(), expected[~cells].sum()
    c = torch.cat([counts[cells], rest_c[None]]) if rest_e >= 5 else counts[cells]
    e = torch.cat([expected[cells], rest_e[None]]) if rest_e >= 5 else expected[cells]
    chi2 = float(((c - e) ** 2 / e).sum())
    df = torch.tensor((c.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(chi2 / 2, dtype=torch.float64)))


def test_outside_mass_is_drawn_through_the_bound_and_rejections():
    model, W, x = setup()
    table = model.argmax_table()
    T = 1.0
    logits = F.linear(x, W)
    s = F.linear(x, table.table)
    m = s[:, :-1].max(dim=1).values
    A = ((s[:, :-1] - m[:, None]) / T).exp().sum(dim=1)
    b = ((s[:, -1] + table.slack * x.norm(dim=1) - m) / T).exp()
    B = ((logits[:, K:] - m[:, None]) / T).exp().sum(dim=1)
    share, keep = (V - K) * b / (A + (V - K) * b), B / ((V - K) * b)
    assert float(share.max()) > 0.5 and float(keep.max()) < 0.5, (share, keep)  # both branches run often
    for row in range(3):
        ids = sample_states(model, x[row].expand(N, D), T, 1.0, torch.Generator().manual_seed(row))
        p = chi_square_p(ids, sampling_probs(logits[row], T, 1.0))
        assert p > 1e-3, (row, p)
        assert bool((ids >= K).any())  # outside tokens were drawn


def test_top_p_nuclei_decided_by_the_shortlist_or_not(monkeypatch):
    """At temperature 1, top_p 0.9: row 0's nucleus (2 shortlist tokens) is decided by the shortlist and drawn
    without the full logits; rows 1 and 2's (38 and 49 tokens, outside ones among them) take the full logits.
    All three draw the full path's distribution."""
    import vlm_dist.infer.generate as gen

    full_rows = []
    plain = gen.sampling_probs
    monkeypatch.setattr(gen, "sampling_probs", lambda logits, t, p: full_rows.append(logits.shape[0]) or plain(logits, t, p))
    model, W, x = setup()
    for row, decided in enumerate((True, False, False)):
        full_rows.clear()
        ids = sample_states(model, x[row].expand(N, D), 1.0, 0.9, torch.Generator().manual_seed(row))
        want = plain(F.linear(x[row], W), 1.0, 0.9)
        assert int((want > 0).sum()) > 1 and chi_square_p(ids, want) > 1e-3, row
        assert sum(full_rows) == (0 if decided else N), (row, sum(full_rows))


def test_a_bound_that_does_not_hold_is_an_error():
    """A table whose bound sits below an outside token's logit (weights written behind its back) would bias the
    draw: the outside branch checks the bound and refuses."""
    import pytest

    model, W, x = setup()
    model.table.slack -= 0.5
    with pytest.raises(RuntimeError, match="exceeds the certified bound"):
        sample_states(model, x[2].expand(5000, D), 1.0, 1.0, torch.Generator().manual_seed(0))


def test_a_nucleus_the_bound_leaves_open_or_an_uncertified_argmax_takes_the_full_logits():
    """Where the outside mass B is known only to lie in [0, B+], a shortlist token can be inside the nucleus for
    some Z = A + B and outside for others (top_p 0.61 here: out for the true Z, in for Z = A + B+); and with
    top_p 1e-9 the nucleus is the argmax, which here is an outside token (its logit beats the shortlist's). Both
    must take the full logits; deciding either from the shortlist draws another distribution."""
    import math

    logits = torch.tensor([0.0, math.log(0.9), math.log(0.8), math.log(0.05)] + [math.log(0.01)] * (K - 4)
                          + [math.log(0.3 / (V - K)) + 0.1 * math.sin(j) for j in range(V - K)])
    W = torch.zeros(V, D)
    W[:, 0] = logits  # x = e_0: the logits are W's first column
    x = torch.zeros(D)
    x[0] = 1.0
    model = Table(W)
    A, B = float(logits[:K].exp().sum()), float(logits[K:].exp().sum())
    table = model.argmax_table()
    B_up = (V - K) * math.exp(float(F.linear(x[None], table.table)[0, -1] + table.slack))
    before = float(logits[:2].exp().sum())  # mass before the third shortlist token
    assert 0.61 * A < before <= 0.61 * (A + B_up) and before > 0.61 * (A + B)  # open, and out for the true Z
    ids = sample_states(model, x.expand(N, D), 1.0, 0.61, torch.Generator().manual_seed(0))
    assert chi_square_p(ids, sampling_probs(F.linear(x, W), 1.0, 0.61)) > 1e-3
    W[K + 5, 0] = 1.0  # an outside token now beats every shortlist logit (0): the argmax is not certified
    model = Table(W)
    ids = sample_states(model, x.expand(1000, D), 1.0, 1e-9, torch.Generator().manual_seed(0))
    assert bool((ids == K + 5).all())
