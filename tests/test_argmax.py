"""The certified shortlist argmax (model/argmax.py) is the full vocabulary's argmax, exactly: where the
certificate holds and, through its fallback, where it must fail (rows outside the shortlist that win);
the model rebuilds it when the weights change; the stacked draft heads compute ExtraHeads' states."""

import pytest
import torch
import torch.nn.functional as F

from vlm_dist.config import load_config
from vlm_dist.model import VLM
from vlm_dist.model.argmax import CertifiedArgmax
from vlm_dist.model.heads import FusedHeads

V, D = 5000, 64


def trained_like(seed=0, outliers=40, dtype=torch.float32):
    """Rows as training leaves them: most in a small ball around one centre (tokens never used), a few
    far from it (the used ones). Returns W (V, D) and the outlier ids."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(D, generator=g) * 0.2
    W = centre + 0.02 * torch.randn(V, D, generator=g)
    used = torch.randperm(V, generator=g)[:outliers]
    W[used] = torch.randn(outliers, D, generator=g) * 0.3
    return W.to(dtype), used


def full_argmax(x, W):
    return F.linear(x.to(W.dtype), W).argmax(dim=-1)


def states(n, seed=1, dtype=torch.float32):
    """Normalised hidden states like a final LayerNorm's output."""
    g = torch.Generator().manual_seed(seed)
    return F.layer_norm(torch.randn(n, D, generator=g), (D,)).to(dtype)


def test_certificate_holds_and_matches_full_argmax_on_trained_like_weights():
    W, used = trained_like()
    table = CertifiedArgmax(W)
    assert set(used.tolist()) <= set(table.ids.tolist())  # the shortlist found the used tokens from W alone
    x = states(400)
    x = x + 3 * F.normalize(W[used[torch.arange(400) % len(used)]], dim=1)  # states that point at a used token
    assert torch.equal(table(x), full_argmax(x, W))
    assert table.rows == 400 and table.fallback_rows < 20  # nearly every row certified
    assert torch.equal(table(x[:1]), full_argmax(x[:1], W))  # a single row too


def test_adversarial_rows_outside_the_shortlist_fall_back_and_stay_exact():
    W, used = trained_like(outliers=300)
    table = CertifiedArgmax(W, size=64)  # a shortlist smaller than the used tokens: some winners are outside
    short = set(table.ids.tolist())
    outside = torch.tensor([i for i in used.tolist() if i not in short])
    assert len(outside) > 100
    x = torch.cat([F.normalize(W[outside[:50]], dim=1) * 8, states(50)])
    assert torch.equal(table(x), full_argmax(x, W))
    assert table.fallback_rows >= 50  # every state pointing outside the shortlist failed the certificate

    # a row outside a given shortlist with a huge norm, aligned with x: it wins, the certificate must fail
    W2 = W.clone()
    j = outside[0].item()
    W2[j] = 50 * F.normalize(W[j], dim=0)
    ids = torch.tensor(sorted(short))
    table2 = CertifiedArgmax(W2, ids=ids)
    x2 = torch.cat([F.normalize(W2[j], dim=0)[None] * 8, states(20, seed=5)])  # also states where j wins less plainly
    assert table2(x2[:1]).item() == j
    assert torch.equal(table2(x2), full_argmax(x2, W2))
    assert table2.fallback_rows >= 1

    # a winner outside the shortlist by a hair (1e-6 relative) over the best shortlist row
    inside = ids[0].item()
    W3 = W.clone()
    W3[j] = W3[inside] * (1 + 1e-6)
    table3 = CertifiedArgmax(W3, ids=ids)
    x3 = F.normalize(W3[inside], dim=0)[None] * 8
    assert table3(x3).item() == full_argmax(x3, W3).item() == j
    assert table3.fallback_rows == 1


def test_untrained_weights_fall_back_to_the_full_argmax():
    torch.manual_seed(0)
    W = torch.randn(V, D) * 0.02  # every row alike: no certificate can hold for most states
    table = CertifiedArgmax(W)
    x = states(64)
    assert torch.equal(table(x), full_argmax(x, W))
    assert table.fallback_rows > 32


def test_bf16_certified_argmax_equals_bf16_full_argmax():
    W, used = trained_like(seed=3, dtype=torch.bfloat16)
    table = CertifiedArgmax(W)
    x = (states(200, seed=4) + 3 * F.normalize(W[used[torch.arange(200) % len(used)]].float(), dim=1)).to(torch.bfloat16)
    assert torch.equal(table(x), full_argmax(x, W))
    assert table.fallback_rows < 20


def test_shortlist_is_the_whole_vocabulary_when_asked():
    W, _ = trained_like()
    table = CertifiedArgmax(W, size=V)
    x = states(10)
    assert torch.equal(table(x), full_argmax(x, W)) and table.fallback_rows == 0 and table.rows == 10
    with pytest.raises(ValueError, match="non-empty shortlist"):
        CertifiedArgmax(W, size=0)


def model_tiny(n_future=4):
    torch.manual_seed(0)
    return VLM(load_config("tiny", [f"model.n_future={n_future}"]).model).eval()


def test_model_rebuilds_the_table_when_weights_change():
    model = model_tiny()
    x = torch.randn(5, model.cfg.d_model)
    first = model.argmax_table()
    assert model.argmax_table() is first  # cached while the weights stand
    with torch.no_grad():
        model.lm_head.weight[7] += 100 * F.normalize(x[0], dim=0)  # an in-place update (as an optimizer step)
    assert model.argmax_table() is not first
    assert model.greedy_ids(x)[0].item() == 7
    assert torch.equal(model.greedy_ids(x), F.linear(x, model.lm_head.weight).argmax(-1))
    assert model.fused_heads() is model.fused_heads()


@pytest.mark.parametrize("B", [1, 3])
def test_fused_heads_equal_the_extra_heads(B):
    """FusedHeads (folded norms, stacked heads, one query position) gives ExtraHeads' states at that
    position, and writes the same keys and values into the cache."""
    model = model_tiny()
    T = 5
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 1000, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_cache = model.new_cache(B)
        ref = model.step_states(ids, ref_cache, images=images)[1:]  # per extra head (B, T, D)
        cache = model.new_cache(B)
        h = model.trunk(model.embed(images, ids), cache)
        at = torch.tensor([T - 1, 2, 0][:B]) + model.n_image_tokens
        got = FusedHeads(model.extra_heads)(h, cache, model.cfg.n_layers, at)  # (m, B, D)
    for k in range(len(ref)):
        torch.testing.assert_close(got[k], ref[k][torch.arange(B), at - model.n_image_tokens], atol=1e-5, rtol=1e-5)
    S = model.n_image_tokens + T
    torch.testing.assert_close(cache.k[:, :, :, :S], ref_cache.k[:, :, :, :S], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :S], ref_cache.v[:, :, :, :S], atol=1e-5, rtol=1e-5)


def test_fused_heads_equal_the_extra_heads_after_a_ragged_crop():
    """As above, in the state speculative decoding calls them in: a prompt prefilled, rows cropped back to different
    lengths (rejected drafts), then T more tokens fed; each head's state at each row's own position, with its
    attention over that row's keys only, and the keys and values written at each row's positions."""
    model, B, T = model_tiny(), 3, 4
    P = model.n_image_tokens
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(1, 1000, (B, 6), generator=torch.Generator().manual_seed(2))
    new = torch.randint(1, 1000, (B, T), generator=torch.Generator().manual_seed(3))
    lengths, at = [P + 6, P + 3, P + 1], torch.tensor([T - 1, 1, 0])
    with torch.no_grad():
        ref_cache, cache = model.new_cache(B), model.new_cache(B)
        for c in (ref_cache, cache):
            model.step_states(prompt, c, images=images)
            c.crop(lengths)  # stale keys stay past each row's length: they must stay unseen
        ref = model.step_states(new, ref_cache)[1:]  # ExtraHeads through the ragged cache, (B, T, D) per head
        h = model.fed_states(new, cache)
        got = FusedHeads(model.extra_heads)(h, cache, model.cfg.n_layers, at)  # (m, B, D)
    for k in range(len(ref)):
        torch.testing.assert_close(got[k], ref[k][torch.arange(B), at], atol=1e-5, rtol=1e-5)
    for b, n in enumerate(lengths):  # every layer's keys and values up to the T new ones
        torch.testing.assert_close(cache.k[:, b, :, : n + T], ref_cache.k[:, b, :, : n + T], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, b, :, : n + T], ref_cache.v[:, b, :, : n + T], atol=1e-5, rtol=1e-5)


def test_decoding_sees_weights_updated_through_data():
    """DeepSpeed's ZeRO optimizer writes the weights through `.data` (same storage, no version bump): a
    decode after such an update must not use the argmax table built from the old weights."""
    from vlm_dist.infer.generate import generate
    from vlm_dist.infer.speculative import speculative_generate_batch
    from vlm_dist.text import get_tokenizer, prompt_tokens

    model = model_tiny()
    W = model.lm_head.weight
    Vm, Dm = W.shape
    g = torch.Generator().manual_seed(0)
    b = F.normalize(torch.randn(Dm, generator=g), dim=0)
    with torch.no_grad():  # every head-0 state is b (the final norm's bias), the rows trained-like
        model.norm.weight.zero_()
        model.norm.bias.copy_(b)
        W.copy_(0.1 * torch.randn(Dm, generator=g) + 0.01 * torch.randn(Vm, Dm, generator=g))
        W[100:400] = torch.randn(300, Dm, generator=g) * 0.3
        W[123] = 5 * b  # the winner, in the shortlist
    images = torch.randn(2, 3, 32, 32, generator=g)
    prompts = [prompt_tokens(get_tokenizer(), None)] * 2

    def check():
        want = generate(model, images, prompts, max_new_tokens=4, use_cache=False)  # full logits: the reference
        assert generate(model, images, prompts, max_new_tokens=4) == want
        assert speculative_generate_batch(model, images, prompts, max_new_tokens=4)[0] == want
        return want

    assert check()[0][0] == 123
    assert model.argmax_table().fallback_rows == 0  # the certificate held: the table decided
    j = 40000  # far from the old shortlist; now the winner
    new = W.detach().clone()
    new[j] = 9 * b
    W.data.copy_(new)  # as ZeRO's optimizer step does, on a model in training
    model.train()  # (decoding a model in training rebuilds its argmax table)
    assert check()[0][0] == j
    model.eval()
    new[j + 1] = 11 * b
    W.data.copy_(new)
    model.drop_decode_caches()  # an eval-mode model: the caller says the weights changed
    assert check()[0][0] == j + 1


def test_autocast_does_not_void_the_certificate():
    """Under autocast the shortlist matmul would run in bf16 while the rounding allowance is fp32's:
    a row outside the shortlist that wins by 0.01 must not be hidden by bf16 rounding of the logits."""
    Dn = 8
    e0, v = torch.eye(Dn)[0], torch.eye(Dn)[1]
    c, R = 100 * e0, 0.045
    rows = [c + 0.044 * v, -c]  # the shortlist: row 0 (close to the winner), row 1 (far away)
    rows += [c + R * v, c - R * v]  # outside: row 2 wins, the ball around c has radius R
    rows += [c + R * s * torch.eye(Dn)[k] for k in range(2, Dn) for s in (1, -1)]
    W = torch.stack(rows)
    x = (1.0024 * e0 + 10 * v)[None]  # x . c = 100.24; logits: row 0 100.68, row 2 100.69
    assert F.linear(x, W).argmax().item() == 2
    table = CertifiedArgmax(W, ids=torch.tensor([0, 1]))
    assert table(x).item() == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert table(x).item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_states_and_weights_give_the_full_argmax(dtype):
    """NaN / inf in a state or in a weight row (inside or outside the shortlist) never certifies a
    wrong row: such rows fall back and answer what the full matmul's argmax answers."""
    W, used = trained_like(dtype=dtype)
    table = CertifiedArgmax(W)
    x = states(6, dtype=dtype)
    x[0, 3], x[1, 5], x[2] = float("nan"), float("inf"), float("-inf")
    x[3] = 0
    assert torch.equal(table(x), full_argmax(x, W))
    outside = next(i for i in range(V) if i not in set(table.ids.tolist()))
    for row, value in [(used[0].item(), float("nan")), (outside, float("inf")), (outside, float("nan"))]:
        W2 = W.clone()
        W2[row, 0] = value
        x2 = states(8, seed=7, dtype=dtype)
        assert torch.equal(CertifiedArgmax(W2, ids=table.ids)(x2), full_argmax(x2, W2)), (row, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_of_tiny_or_huge_norm_give_the_full_argmax(dtype):
    """Scaling a state changes no argmax. Below ~1e-19 per entry its fp32 norm underflows (0 at ~1e-23) while
    the logits do not, so the certificate must not pass such rows; above ~1e19 the norm overflows to inf."""
    W, _ = trained_like(dtype=dtype)
    table = CertifiedArgmax(W)
    x = F.layer_norm(states(500), (D,))
    want = full_argmax(x.to(dtype), W)
    for scale in (1e-19, 1e-21, 1e-23, 1e-25, 1e20):
        scaled = (x * scale).to(dtype)
        assert torch.equal(table(scaled), full_argmax(scaled, W)), scale
    assert torch.equal(table(x.to(dtype)), want)
