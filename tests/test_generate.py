"""Generation invariants: KV-cached == uncached, batched == one by one, sampling is seeded."""

import torch

from vlm_dist.config import load_config
from vlm_dist.infer.generate import generate, generate_text
from vlm_dist.model import VLM
from vlm_dist.text import get_tokenizer, prompt_tokens

tok = get_tokenizer()


def model_and_images(seed=0, B=4):
    torch.manual_seed(seed)
    model = VLM(load_config("tiny", ["model.max_seq_len=64"]).model).eval()
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


def mixed_prompts(B):
    questions = [None, "what colour is the circle?", None, "how many shapes are there?"]
    return [prompt_tokens(tok, questions[b % 4]) for b in range(B)]


def test_cached_generation_equals_uncached():
    model, images = model_and_images()
    prompts = mixed_prompts(4)
    cached = generate(model, images, prompts, max_new_tokens=12, use_cache=True)
    uncached = generate(model, images, prompts, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert all(len(c) == 12 for c in cached)  # random weights rarely emit <eot>: full length compared


def test_batched_generation_equals_one_by_one():
    model, images = model_and_images(seed=3, B=4)
    prompts = mixed_prompts(4)
    batched = generate(model, images, prompts, max_new_tokens=10)
    single = [generate(model, images[b : b + 1], [prompts[b]], max_new_tokens=10)[0] for b in range(4)]
    assert batched == single


def test_generation_stops_at_end_token():
    model, images = model_and_images(seed=5, B=2)
    with torch.no_grad():  # make <eot> the certain next token after any input
        model.lm_head.weight.zero_()  # (tied: the embeddings too)
        model.lm_head.weight[tok.eos_id] = 1.0
        for norm in [model.norm]:
            norm.weight.fill_(1.0)
            norm.bias.fill_(10.0)
    out = generate(model, images, mixed_prompts(2), max_new_tokens=8)
    assert out == [[], []]


def test_sampling_is_seeded_and_top_p_one_token_is_greedy():
    model, images = model_and_images(seed=7, B=2)
    prompts = mixed_prompts(2)
    a = generate(model, images, prompts, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, images, prompts, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    greedy = generate(model, images, prompts, 8)
    tiny_p = generate(model, images, prompts, 8, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(2))
    assert tiny_p == greedy  # a nucleus of one token is the argmax


def full_sort_nucleus(logits, temperature, top_p):
    """sampling_probs as it was before round 12: a sort of every row over the whole vocabulary."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p > top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def test_top_p_sorts_only_candidates_and_equals_the_full_sort(monkeypatch):
    """sampling_probs' nucleus from each row's top-k candidates equals the full sort's to the bit: peaked rows
    (few candidates), flat rows (the full sort), a batch mixing both (each group its own way), 3-D input, a
    nucleus of one token, and top_p next to 1."""
    import vlm_dist.infer.generate as gen

    calls = []  # (rows, k) of every cut_rows call
    cut_rows = gen.cut_rows
    monkeypatch.setattr(gen, "cut_rows", lambda probs, top_p, k: calls.append((probs.shape[0], k)) or cut_rows(probs, top_p, k))
    V, g = tok.vocab_size, torch.Generator().manual_seed(0)
    peaked = torch.randn(6, V, generator=g) * 8  # softmax at T 0.7: a few hundred tokens hold nearly all mass
    flat = torch.randn(2, V, generator=g) * 0.1
    cases = [(peaked, 0.7, p) for p in (1e-9, 0.3, 0.9, 0.99, 0.999999)]
    cases += [(flat, 1.0, 0.9), (torch.cat([peaked[:2], flat[:1]]), 0.7, 0.9), (peaked.view(2, 3, V), 0.7, 0.9)]
    for logits, t, p in cases:
        calls.clear()
        assert torch.equal(gen.sampling_probs(logits, t, p), full_sort_nucleus(logits, t, p)), (t, p)
        if p == 0.9 and t == 0.7:  # the peaked rows took the candidates' path, the flat one the full sort
            assert all(k < V // 10 for _, k in calls[:1]) and calls[1:] in ([], [(1, V)]), calls
        if t == 1.0:
            assert calls == [(2, V)], calls
    # top_p 1 - 1e-8 is 1.0 in fp32: nothing is cut, yet tokens under 1e-8 / 2V are not candidates; their mass
    # never passes top_p, so the check in cut_rows sends the rows to the full sort (without it they are dropped)
    calls.clear()
    assert torch.equal(gen.sampling_probs(peaked, 0.7, 1 - 1e-8), full_sort_nucleus(peaked, 0.7, 1 - 1e-8))
    assert calls and calls[0][1] < V, calls


def test_generate_text_decodes_the_generated_ids():
    model, images = model_and_images(B=2)
    texts = generate_text(model, images, [None, "what colour?"], max_new_tokens=4)
    ids = generate(model, images, [prompt_tokens(tok), prompt_tokens(tok, "what colour?")], max_new_tokens=4)
    assert texts == [tok.decode(i) for i in ids] and any(ids)


def _copy_head_model(seed):
    """Extra heads made identities of the trunk: each drafts head 0's token again, so a greedy run
    that repeats a token gets multi-token acceptances (random weights repeat tokens a lot)."""
    model, images = model_and_images(seed=seed, B=3)
    with torch.no_grad():
        for block, norm in zip(model.extra_heads.blocks, model.extra_heads.norms):
            for linear in (block.attn.out, block.mlp[2]):
                linear.weight.zero_()
                linear.bias.zero_()
            norm.load_state_dict(model.norm.state_dict())
    return model, images


def test_self_speculative_decoding_equals_greedy():
    from vlm_dist.infer.speculative import speculative_generate

    accepted = []
    for seed, make in [(11, model_and_images), (12, _copy_head_model), (13, _copy_head_model)]:
        model, images = make(seed=seed, B=3) if make is model_and_images else make(seed)
        prompts = mixed_prompts(3)
        greedy = generate(model, images, prompts, max_new_tokens=16)
        for b in range(3):
            ids, stats = speculative_generate(model, images[b], prompts[b], max_new_tokens=16)
            assert ids == greedy[b], (seed, b)
            accepted.append(stats["tokens_per_call"])
    assert max(accepted) > 1.5  # the multi-token path was exercised, not only one token per call


def test_a_decode_that_raises_hands_the_model_back_in_training_mode(monkeypatch):
    """generate and speculative decoding switch a training model to eval for the decode; an error inside
    the decode must not leave it in eval mode (dropout off, caches kept) for the training that follows."""
    from vlm_dist.infer.speculative import speculative_generate_batch

    torch.manual_seed(0)
    model = VLM(load_config("tiny", ["model.max_seq_len=64", "model.n_future=2"]).model).train()
    images = torch.randn(2, 3, 32, 32)
    prompts = mixed_prompts(2)

    def broken(*args, **kwargs):
        assert not model.training  # the decode itself ran in eval mode
        raise RuntimeError("decode failed")

    for name, decode in [("step_states", generate), ("verify_step", speculative_generate_batch)]:
        with monkeypatch.context() as m:
            m.setattr(model, name, broken)
            try:
                decode(model, images, prompts, max_new_tokens=4)
            except RuntimeError as err:
                assert str(err) == "decode failed"
            else:
                raise AssertionError(f"{decode.__name__} did not reach model.{name}")
        assert model.training, decode.__name__
    assert generate(model, images, prompts, max_new_tokens=4) and model.training  # and decodes afterwards
