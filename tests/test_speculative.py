"""Self-speculative decoding is greedy decoding, token for token, batched and ragged; its KV cache after a
rejection is the accepted prefix's; it reports only emitted tokens."""

import pytest
import torch

from vlm_dist.config import load_config
from vlm_dist.infer.generate import generate
from vlm_dist.infer.speculative import speculative_generate, speculative_generate_batch
from vlm_dist.model import VLM
from vlm_dist.text import get_tokenizer, prompt_tokens

tok = get_tokenizer()
# Three memorised captions of different lengths, one per image class (a constant image of -1, 0, +1).
CAPTIONS = ["a small red circle on the left", "a large blue square on the right and a small green triangle in the center",
            "two shapes"]


def class_images(classes, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([c - 1.0 for c in classes])[:, None, None, None].expand(-1, 3, 32, 32)
    return base + noise * torch.randn(len(classes), 3, 32, 32, generator=g)


def untrained(n_future, seed=0):
    torch.manual_seed(seed)
    return VLM(load_config("tiny", [f"model.n_future={n_future}", "model.max_seq_len=64"]).model).eval()


@pytest.fixture(scope="module")
def trained4():
    """A tiny n_future=4 model trained in-process (plain AdamW, ~10 s) to caption the three classes: its
    heads agree with head 0, so drafts are mostly accepted and sequences end inside accepted drafts."""
    from vlm_dist.text import build_example, collate_examples, make_targets

    model = untrained(4, seed=1).train()
    examples = [build_example(tok, c, 40) for c in CAPTIONS]
    tokens, mask = collate_examples(examples, tok.pad_id)
    inputs, targets = make_targets(tokens, mask, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        loss = model(class_images([0, 1, 2], noise=0.1, seed=step), inputs, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def truncated(model, n_future):
    """The same trunk and first n_future-1 extra heads as a model with n_future heads."""
    cfg = model.cfg.model_copy(update={"n_future": n_future, "mtp_weights": None})
    small = VLM(cfg).eval()
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return small


def mixed_prompts(B):
    questions = [None, "what colour is the circle?", None, "how many shapes are there?"]
    return [prompt_tokens(tok, questions[b % 4]) for b in range(B)]


@pytest.mark.parametrize("n_future", [1, 2, 3, 4])
def test_speculative_equals_greedy_untrained_batch_1_and_8(n_future):
    model = untrained(n_future, seed=n_future)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(n_future))
    prompts = mixed_prompts(8)
    greedy = generate(model, images, prompts, max_new_tokens=12)
    rows, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=12)
    assert rows == greedy
    assert stats["tokens"] == sum(map(len, greedy)) and stats["accepted_per_position"][0] == 1.0
    ids, _ = speculative_generate(model, images[3], prompts[3], max_new_tokens=12)
    assert ids == greedy[3]


@pytest.mark.parametrize("n_future", [2, 3, 4])
def test_speculative_equals_greedy_trained_with_high_acceptance(trained4, n_future):
    model = trained4 if n_future == 4 else truncated(trained4, n_future)
    classes = [0, 1, 2, 1, 0, 2, 1, 1]
    images = class_images(classes, noise=0.1, seed=99)
    prompts = [prompt_tokens(tok)] * 6 + mixed_prompts(2)  # two rows with longer (question) prompts
    greedy = generate(model, images, prompts, max_new_tokens=30)
    assert [tok.decode(greedy[b]) for b in range(3)] == [CAPTIONS[c] for c in classes[:3]]  # it learned them
    rows, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=30)
    assert rows == greedy
    assert stats["tokens_per_call"] > 0.6 * n_future  # most drafts accepted
    assert stats["tokens"] == sum(map(len, greedy))  # the end tokens are not counted
    for b in (0, 1, 7):
        ids, single = speculative_generate(model, images[b], prompts[b], max_new_tokens=30)
        assert ids == greedy[b]
        assert single["tokens_per_call"] == len(ids) / single["row_calls"]


@pytest.mark.parametrize("n_future", [2, 4])
def test_speculative_fills_the_context_like_greedy(n_future):
    """max_new_tokens up to the last position greedy can use: the last calls' drafts run past
    max_seq_len into spare cache slots, and the output is still greedy's."""
    model = untrained(n_future, seed=7)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    prompts = mixed_prompts(3)
    room = model.cfg.max_seq_len - model.n_image_tokens - max(map(len, prompts))
    greedy = generate(model, images, prompts, max_new_tokens=room)
    rows, _ = speculative_generate_batch(model, images, prompts, max_new_tokens=room)
    assert rows == greedy and max(map(len, rows)) == room  # an untrained model runs to the limit
    with pytest.raises(ValueError, match="exceed"):
        speculative_generate_batch(model, images, prompts, max_new_tokens=room + 1)


def test_length_limit_inside_an_accepted_draft(trained4):
    images = class_images([1, 1, 0, 2])
    prompts = [prompt_tokens(tok)] * 4
    cut_inside = 0
    for max_new in range(1, 19):
        greedy = generate(trained4, images, prompts, max_new_tokens=max_new)
        rows, stats = speculative_generate_batch(trained4, images, prompts, max_new_tokens=max_new)
        assert rows == greedy, max_new
        assert stats["tokens"] == sum(map(len, greedy))
        cut_inside += max_new % 4 != 0 and len(greedy[0]) == max_new and stats["row_calls"] < 4 * max_new
    assert cut_inside > 3  # limits that fall inside a multi-token draft were exercised


def test_bf16_speculative_equals_bf16_greedy(trained4):
    model = VLM(trained4.cfg).eval()
    model.load_state_dict(trained4.state_dict())
    model.to(torch.bfloat16)
    images = class_images([0, 1, 2, 1], noise=0.1, seed=3)
    prompts = mixed_prompts(4)
    greedy = generate(model, images, prompts, max_new_tokens=20)
    rows, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=20)
    assert rows == greedy and stats["tokens_per_call"] > 2


def test_cache_after_rejection_equals_cache_of_accepted_prefix():
    model = untrained(4, seed=5)
    B, P = 2, model.n_image_tokens
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompt = torch.tensor([prompt_tokens(tok)] * B)
    draft = torch.tensor([[320, 2442, 736, 7117], [320, 3638, 4481, 14615]])
    with torch.no_grad():
        cache = model.new_cache(B)
        model.step_states(prompt, cache, images=images)
        base = cache.lengths[0]
        model.step_states(draft, cache)
        accepted = [1, 3]  # row 0 rejects draft token 1, row 1 draft token 3: the cache becomes ragged
        cache.crop([base + a for a in accepted])
        nxt = torch.tensor([[5], [6]])
        states = model.step_states(nxt, cache)  # feeds each row at its own position, past stale keys
        for b in range(B):
            seq = torch.cat([prompt[b], draft[b, : accepted[b]], nxt[b]])[None]
            direct = model.new_cache(1)
            ref = model.step_states(seq, direct, images=images[b : b + 1])
            L = direct.lengths[0]
            assert L == cache.lengths[b] == P + 1 + accepted[b] + 1
            torch.testing.assert_close(cache.k[:, b, :, :L], direct.k[:, 0, :, :L], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[:, b, :, :L], direct.v[:, 0, :, :L], atol=1e-5, rtol=1e-5)
            for s, r in zip(states, ref):
                torch.testing.assert_close(s[b, -1], r[0, -1], atol=1e-5, rtol=1e-5)


def test_certificate_holds_on_a_trained_model(trained4):
    """On a trained model the shortlist certifies (nearly) every argmax: greedy and speculative decoding
    pay for the full vocabulary's matmul only where the certificate fails (model/argmax.py)."""
    table = trained4.argmax_table()
    rows, fallback = table.rows, table.fallback_rows
    images = class_images([0, 1, 2, 1], noise=0.1, seed=5)
    prompts = [prompt_tokens(tok)] * 4
    assert speculative_generate_batch(trained4, images, prompts, 30)[0] == generate(trained4, images, prompts, 30)
    assert trained4.argmax_table() is table and table.rows - rows > 50
    assert table.fallback_rows - fallback <= 0.1 * (table.rows - rows)
    assert table.size < trained4.vocab_size // 10  # a real shortlist


def test_no_new_tokens_emit_nothing_and_one_image_may_be_its_tower_tokens(trained4):
    """max_new_tokens 0: no token, as greedy (the limit is checked before a draft token is emitted). One image's
    frozen-tower tokens (P, W) or (1, P, W) (precompute-features) decode as its pixels do."""
    import copy

    images, prompts = class_images([0, 1]), mixed_prompts(2)
    assert speculative_generate_batch(trained4, images, prompts, max_new_tokens=0)[0] == [[], []]
    assert generate(trained4, images, prompts, max_new_tokens=0) == [[], []]
    frozen = copy.deepcopy(trained4)
    frozen.vision.frozen = True  # tower tokens stand in for a frozen tower only
    with torch.no_grad():
        tokens = frozen.vision(images[:1])  # (1, P, W)
    want = speculative_generate(frozen, images[0], prompts[0], max_new_tokens=8)
    assert len(want[0]) > 0
    assert speculative_generate(frozen, tokens, prompts[0], max_new_tokens=8) == want
    assert speculative_generate(frozen, tokens[0], prompts[0], max_new_tokens=8) == want
