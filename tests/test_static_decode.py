"""Fixed-shape decoding (infer/static.py, what a GPU replays as CUDA graphs) decodes what the dynamic path
decodes: greedy and self-speculative, batched and ragged, to the end token or the length limit, and one verify
call leaves the cache the dynamic call leaves."""

import pytest
import torch

from tests.test_speculative import class_images, mixed_prompts, trained4, truncated, untrained  # noqa: F401
from vlm_dist.config import load_config
from vlm_dist.infer.generate import generate
from vlm_dist.infer.speculative import speculative_generate_batch
from vlm_dist.infer.static import StaticSteps, graphed
from vlm_dist.model import VLM


def hiding(n_future: int) -> VLM:
    """An untrained model whose first block hides the image from text queries (text_first_layers=1)."""
    torch.manual_seed(3)
    cfg = load_config("tiny", [f"model.n_future={n_future}", "model.max_seq_len=64", "model.text_first_layers=1"])
    return VLM(cfg.model).eval()


@pytest.mark.parametrize("make", [lambda: untrained(1), lambda: untrained(4), lambda: hiding(3)], ids=["n1", "n4", "hide"])
@pytest.mark.parametrize("B", [1, 8])
def test_static_greedy_equals_greedy(make, B):
    model = make()
    images, prompts = class_images([b % 3 for b in range(B)], noise=0.3), mixed_prompts(B)
    want = generate(model, images, prompts, max_new_tokens=12)
    assert generate(model, images, prompts, max_new_tokens=12, static=True) == want
    assert sum(map(len, want)) > 0


@pytest.mark.parametrize("n_future", [2, 3, 4])
@pytest.mark.parametrize("B", [1, 8])
def test_static_speculative_equals_greedy_untrained(n_future, B):
    model = untrained(n_future) if n_future != 3 else hiding(3)
    images, prompts = class_images([b % 3 for b in range(B)], noise=0.3), mixed_prompts(B)
    want = generate(model, images, prompts, max_new_tokens=12)
    got, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=12, static=True)
    assert got == want
    dynamic = speculative_generate_batch(model, images, prompts, max_new_tokens=12)[1]
    assert stats == dynamic  # the same calls, acceptances and emitted tokens, though finished rows stay in the batch


@pytest.mark.parametrize("n_future", [2, 3, 4])
def test_static_speculative_equals_greedy_trained(trained4, n_future):  # noqa: F811
    """Much is accepted; rows end with the end token inside accepted drafts at different calls, and at the
    length limit (max_new_tokens 5) inside a draft."""
    model = truncated(trained4, n_future)
    images = class_images([0, 1, 2, 1, 0, 2, 2, 1], noise=0.1, seed=99)
    prompts = mixed_prompts(8)
    for limit in (30, 5):
        want = generate(model, images, prompts, max_new_tokens=limit)
        got, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=limit, static=True)
        assert got == want, limit
        assert stats == speculative_generate_batch(model, images, prompts, max_new_tokens=limit)[1]
        assert stats["tokens_per_call"] > 1.5 or limit == 5


def test_static_decoding_fills_the_context_like_greedy():
    """Prompt + max_new_tokens exactly at model.max_seq_len: no write past the cache, the same tokens."""
    model = untrained(4)
    images, prompts = class_images([0, 1, 2, 0]), mixed_prompts(4)
    room = model.cfg.max_seq_len - model.n_image_tokens - max(map(len, prompts))
    want = generate(model, images, prompts, max_new_tokens=room)
    assert generate(model, images, prompts, max_new_tokens=room, static=True) == want
    assert speculative_generate_batch(model, images, prompts, max_new_tokens=room, static=True)[0] == want
    assert max(map(len, want)) == room  # some row ran to the limit


def replaying(fn, *inputs):
    """What `graphed` does on a GPU, on the CPU: the inputs copied into fixed buffers at each call, two
    warm-up runs that write the cache as the capture's would, and the SAME output tensors returned by every
    call, overwritten in place: a caller that kept an output past the next call would read the new values."""
    static = [x.clone() for x in inputs]
    fn(*static)
    first = fn(*static)
    outputs = [t.clone() for t in first] if isinstance(first, tuple) else first.clone()

    def replay(*args):
        for buf, x in zip(static, args):
            buf.copy_(x)
        fresh = fn(*static)
        if isinstance(outputs, list):
            for out, new in zip(outputs, fresh):
                out.copy_(new)
            return tuple(outputs)
        outputs.copy_(fresh)
        return outputs

    return replay


def test_callers_handle_replayed_graphs(monkeypatch, trained4):  # noqa: F811
    """The decoding loops with graph-like replays (fixed input buffers, reused output buffers, warm-up writes)
    still decode greedy's tokens with the dynamic loop's stats."""
    import vlm_dist.infer.generate as gen
    import vlm_dist.infer.speculative as spec

    monkeypatch.setattr(gen, "graphed", replaying)
    monkeypatch.setattr(spec, "graphed", replaying)
    images, prompts = class_images([0, 1, 2, 1, 0, 2, 2, 1], noise=0.1, seed=7), mixed_prompts(8)
    for model in (trained4, untrained(2)):
        want = generate(model, images, prompts, max_new_tokens=20)
        assert generate(model, images, prompts, max_new_tokens=20, static=True) == want
        got, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=20, static=True)
        assert got == want
        assert stats == speculative_generate_batch(model, images, prompts, max_new_tokens=20)[1]


def test_static_verify_writes_the_cache_the_dynamic_call_writes(trained4):  # noqa: F811
    """One verify call on two copies of a ragged cache (rows at different lengths): the same accepted counts,
    next tokens and guesses, and the same keys and values at every position a row keeps."""
    model = trained4
    images, prompts = class_images([0, 1, 2]), mixed_prompts(3)
    ids = torch.zeros(3, max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    n = model.cfg.n_future
    caches = [model.new_cache(3, model.cfg.max_seq_len + n) for _ in range(2)]
    for cache in caches:
        model.verify_step(ids, cache, images=images, last=torch.tensor([len(p) - 1 for p in prompts]))
        cache.set_lengths([model.n_image_tokens + len(p) for p in prompts])
    draft = torch.tensor([[320, 2442, 736, 7117], [269, 1400, 320, 2442], [518, 518, 320, 269]])
    base = caches[0].lengths
    heads = model.fused_heads()  # both paths' stacked heads: record the states they hand to the argmax
    finish, states = heads.finish, []
    heads.finish = lambda *args: states.append(finish(*args)) or states[-1]
    try:
        dyn = model.verify_step(draft, caches[0], heads=heads)
        sta = graphed(StaticSteps(model, caches[1]).verify, draft, torch.tensor(base))(draft, torch.tensor(base))
    finally:
        del heads.finish
    for a, b in zip(dyn, sta):
        assert torch.equal(a, b)
    torch.testing.assert_close(states[1], states[0], rtol=1e-5, atol=1e-5)  # the heads attended to the same keys
    for b in range(3):
        keep = base[b] + int(dyn[1][b]) + 1
        torch.testing.assert_close(caches[1].k[:, b, :, :keep], caches[0].k[:, b, :, :keep], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(caches[1].v[:, b, :, :keep], caches[0].v[:, b, :, :keep], rtol=1e-6, atol=1e-6)


def test_static_decoding_refuses_sampling():
    model = untrained(2)
    with pytest.raises(ValueError, match="temperature 0"):
        generate(model, class_images([0]), mixed_prompts(1), max_new_tokens=4, temperature=1.0, static=True)


def test_later_decodes_replay_the_step_captured_by_the_first(monkeypatch, trained4):  # noqa: F811
    """An evaluation's batches: decodes of one shape capture once (graphed is called once per decoder), replay
    that step over the kept cache (emptied in between: an earlier decode's keys beyond each row's length stay
    masked), and still decode greedy's tokens; a weight change or drop_decode_caches makes a new capture."""
    import copy

    import vlm_dist.infer.generate as gen
    import vlm_dist.infer.speculative as spec
    from vlm_dist.infer import static as static_mod

    captures = []

    def counting(fn, *inputs):
        captures.append(fn.__name__)
        return replaying(fn, *inputs)

    monkeypatch.setattr(gen, "graphed", counting)
    monkeypatch.setattr(spec, "graphed", counting)
    model = copy.deepcopy(trained4)
    batches = [(class_images([0, 1, 2, 1], noise=0.1, seed=s), mixed_prompts(4)[::d]) for s, d in [(1, 1), (2, -1), (3, 1)]]
    for images, prompts in batches:  # the second batch's prompts are in the other order: other lengths per row
        want = generate(model, images, prompts, max_new_tokens=20, static=False)
        assert generate(model, images, prompts, max_new_tokens=20, static=True) == want
        assert speculative_generate_batch(model, images, prompts, max_new_tokens=20, static=True)[0] == want
    assert captures == ["greedy", "verify"]  # three decodes each, one capture each
    with torch.no_grad():
        next(model.extra_heads.parameters()).mul_(0.5)  # as an optimizer step would: a version bump
    images, prompts = batches[0]
    want = generate(model, images, prompts, max_new_tokens=20, static=False)
    assert speculative_generate_batch(model, images, prompts, max_new_tokens=20, static=True)[0] == want
    assert captures == ["greedy", "verify", "verify"]
    model.drop_decode_caches()  # what the trainer's eval does before decoding (ZeRO writes through .data)
    assert generate(model, images, prompts, max_new_tokens=20, static=True) == want
    assert captures == ["greedy", "verify", "verify", "greedy"]
    for B in range(1, 2 + static_mod.MAX_SESSIONS):  # more shapes than are kept: the oldest go first
        generate(model, class_images([0] * B), mixed_prompts(B), max_new_tokens=3, static=True)
    assert len(model._static_sessions) == static_mod.MAX_SESSIONS
    assert [k[1] for k in model._static_sessions] == list(range(2, 2 + static_mod.MAX_SESSIONS))
    from vlm_dist.infer.generate import decoding

    model.train()  # the trainer's generation eval: nothing kept on the device once training resumes
    with decoding(model):
        assert generate(model, images, prompts, max_new_tokens=20, static=True) == want
        assert len(model._static_sessions) == 1
    assert model.training and "_static_sessions" not in model.__dict__


def test_sessions_start_clean_and_go_with_the_model(trained4):  # noqa: F811
    """A kept cache is zeroed before reuse (a NaN an earlier decode left in a masked slot would still poison the
    attention's sum), .to() drops the sessions, and they hold no reference cycle: the model is freed at `del`."""
    import copy
    import gc
    import weakref

    model = copy.deepcopy(trained4)
    images, prompts = class_images([0, 1, 2, 1], noise=0.1, seed=5), mixed_prompts(4)
    want = generate(model, images, prompts, max_new_tokens=20, static=False)
    assert speculative_generate_batch(model, images, prompts, max_new_tokens=20, static=True)[0] == want
    for s in model._static_sessions.values():
        s.cache.k.fill_(float("nan"))  # what a bad sample could leave behind
    assert speculative_generate_batch(model, images, prompts, max_new_tokens=20, static=True)[0] == want
    model.to(torch.float32)
    assert "_static_sessions" not in model.__dict__
    assert generate(model, images, prompts, max_new_tokens=20, static=True) == want
    gc.disable()
    try:
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_a_model_made_under_inference_mode_decodes_with_every_decoder(trained4):  # noqa: F811
    """Weights made under torch.inference_mode() (a model built or loaded there) are inference tensors, which
    have no version counter: the decode caches' keys (model/stamps.py) must not read one. Every decoder then
    gives the output of the same weights made normally."""
    images, prompts = class_images([0, 1, 2, 1], noise=0.3), mixed_prompts(4)
    want = generate(trained4, images, prompts, max_new_tokens=12)
    with torch.inference_mode():
        model = VLM(trained4.cfg).eval()
        model.load_state_dict(trained4.state_dict())
        assert all(p.is_inference() for p in model.parameters())
        assert generate(model, images, prompts, max_new_tokens=12) == want
        assert generate(model, images, prompts, max_new_tokens=12, static=True) == want
        assert speculative_generate_batch(model, images, prompts, max_new_tokens=12)[0] == want
        assert speculative_generate_batch(model, images, prompts, max_new_tokens=12, static=True)[0] == want
        with torch.no_grad():  # a second decode reuses the table, heads and session made by the first
            assert generate(model, images, prompts, max_new_tokens=12, static=True) == want
    assert sum(map(len, want)) > 0
