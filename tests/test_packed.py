"""bf16 decoding on a CPU through weights packed once for oneDNN (model/packed.py) computes what F.linear
computes, to the bit, and never from stale weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_dist.config import load_config
from vlm_dist.infer.generate import generate
from vlm_dist.infer.speculative import speculative_generate_batch
from vlm_dist.model import VLM, packed
from vlm_dist.text import get_tokenizer, prompt_tokens

pytestmark = pytest.mark.skipif(not packed.AVAILABLE, reason="no oneDNN packed bf16 linear here (this torch build, or a "
                                                             "CPU without its bf16 kernels: AVX2 only); F.linear serves")
tok = get_tokenizer()


def bf16_model(n_future: int, seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    return VLM(load_config("tiny", [f"model.n_future={n_future}", "model.max_seq_len=64"]).model).eval().to(torch.bfloat16)


def packed_copies(model: VLM) -> int:
    owners = [*model.modules(), *([model._fused] if getattr(model, "_fused", None) is not None else [])]
    return sum(len(o.__dict__.get(packed.ATTR, {})) for o in owners)


@torch.no_grad()
def step_states(model: VLM, images: torch.Tensor, prompt: list[int]) -> list[torch.Tensor]:
    cache = model.new_cache(images.shape[0])
    return model.step_states(torch.tensor([prompt] * images.shape[0]), cache, images=images)


def same_states(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_packed_linear_is_f_linear_to_the_bit():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    for shape in [(1, 64), (4, 64), (3, 5, 64), (8, 4, 64)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        owner = nn.Module()
        with torch.no_grad():
            for bias in (b, None):
                assert torch.equal(packed.linear(owner, x, w, bias), F.linear(x, w, bias)), (shape, bias is None)
        assert len(owner.__dict__[packed.ATTR]) == 1  # the packed path ran, one copy for the weight
    # fp32, and any call that autograd records, are F.linear's own: nothing packed
    owner = nn.Module()
    with torch.no_grad():
        assert torch.equal(packed.linear(owner, x.float(), w.float(), None), F.linear(x.float(), w.float()))
    wg = w.clone().requires_grad_()
    packed.linear(owner, x, wg, b).float().sum().backward()
    assert wg.grad is not None and packed.ATTR not in owner.__dict__


def test_decoding_with_packed_weights_equals_decoding_with_f_linear(monkeypatch):
    model = bf16_model(4, seed=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = [prompt_tokens(tok, q) for q in (None, "what colour is the circle?", None, "how many shapes are there?")]
    monkeypatch.setattr(packed, "enabled", False)
    plain = (generate(model, images, prompts, max_new_tokens=10), speculative_generate_batch(model, images, prompts, 10)[0],
             step_states(model, images, prompts[0]))
    assert packed_copies(model) == 0
    monkeypatch.setattr(packed, "enabled", True)
    with_packed = (generate(model, images, prompts, max_new_tokens=10), speculative_generate_batch(model, images, prompts, 10)[0],
                   step_states(model, images, prompts[0]))
    # the four linears of every trunk block and of every extra head's block (step_states runs the heads as
    # blocks), and FusedHeads' stacked q, k, v (speculative decoding; at this width its other linears stay batched)
    assert packed_copies(model) == 4 * (model.cfg.n_layers + model.cfg.n_future - 1) + 1
    assert with_packed[0] == plain[0] and with_packed[1] == plain[1] == plain[0]
    assert same_states(with_packed[2], plain[2])  # every head's states, to the bit


def test_packed_copies_follow_the_weights(monkeypatch):
    model = bf16_model(1, seed=3)
    images, prompt = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), prompt_tokens(tok)

    def reference() -> list[torch.Tensor]:
        monkeypatch.setattr(packed, "enabled", False)
        try:
            return step_states(model, images, prompt)
        finally:
            monkeypatch.setattr(packed, "enabled", True)

    step_states(model, images, prompt)  # packs
    w = model.blocks[0].mlp[0].weight
    with torch.no_grad():
        w.mul_(-1)  # in place, as an optimizer step: the version changes, the next call repacks
    assert same_states(step_states(model, images, prompt), reference())
    # a write through .data, as DeepSpeed's ZeRO optimizer makes, changes neither storage nor version: the
    # packed copy is stale (this is why drop_decode_caches must forget it) ...
    w.data.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)).bfloat16())
    assert not same_states(step_states(model, images, prompt), reference())
    # ... and after it the decode is the new weights' again
    model.drop_decode_caches()
    assert packed_copies(model) == 0
    assert same_states(step_states(model, images, prompt), reference())


def test_a_training_models_decode_leaves_no_packed_copy():
    model = bf16_model(2, seed=4).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    generate(model, images, [prompt_tokens(tok)] * 2, max_new_tokens=4)
    assert model.training and packed_copies(model) == 0
    model.eval()
    generate(model, images, [prompt_tokens(tok)] * 2, max_new_tokens=4)
    assert packed_copies(model) == 4 * model.cfg.n_layers  # an eval model keeps them for its next decode


def test_fused_heads_per_head_packed_linears_are_the_batched_matmuls(monkeypatch):
    """Where the heads are wide (base), FusedHeads runs each head's out / up / down as its own packed linear
    instead of one batched matmul: each equals the batched matmul's head k (layer norms randomised, so that a
    wrongly folded or transposed weight shows), and decoding through them stays greedy's."""
    from vlm_dist.model.heads import FusedHeads

    model = bf16_model(4, seed=6)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.extra_heads.named_parameters():
            if "ln" in name or "norms" in name:  # LayerNorm affine parameters: fold into the linears
                p.copy_(torch.randn(p.shape, generator=g).bfloat16())
    monkeypatch.setattr(FusedHeads, "PER_HEAD_ELEMENTS", 0)  # as wide heads get
    heads = model.fused_heads()
    assert heads.per_head is not None
    m, D = heads.m, model.cfg.d_model
    F_ = heads.up_w.shape[2]
    with torch.no_grad():
        for name, bias, weight_t, width in (("out", heads.out_b, heads.out_w, D), ("up", heads.up_b, heads.up_w, D),
                                            ("down", heads.down_b, heads.down_w, F_)):
            x = torch.randn(m, 5, width, generator=g).bfloat16()
            per_head = heads._linears(name, x, bias, weight_t)
            monkeypatch.setattr(packed, "enabled", False)
            batched = heads._linears(name, x, bias, weight_t)  # torch.baddbmm
            monkeypatch.setattr(packed, "enabled", True)
            scale = batched.float().abs().max()
            assert per_head.shape == batched.shape and (per_head.float() - batched.float()).abs().max() <= 0.02 * scale, name
    assert len(heads.__dict__[packed.ATTR]) == 3 * m  # each head's three linears went through packed copies
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    prompts = [prompt_tokens(tok)] * 3
    greedy = generate(model, images, prompts, max_new_tokens=10)
    rows, stats = speculative_generate_batch(model, images, prompts, 10)
    assert rows == greedy and stats["tokens"] == sum(map(len, greedy))


def test_static_steps_decode_through_packed_weights(monkeypatch):
    """The fixed-shape steps (infer/static.py) multiply by the packed copies too, and decode greedy's tokens."""
    model = bf16_model(1, seed=8)
    images, prompts = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)), [prompt_tokens(tok)] * 2
    dynamic = generate(model, images, prompts, max_new_tokens=8)
    calls = []
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda *a: (calls.append(1), real(*a))[1])
    assert generate(model, images, prompts, max_new_tokens=8, static=True) == dynamic
    steps = max(map(len, dynamic))  # steps after the prefill: up to one per token (the last one gives the end)
    assert len(calls) >= 4 * model.cfg.n_layers * (1 + steps - 1)  # the prefill's linears and every static step's


def test_packed_copies_survive_inference_mode_copies_and_replaced_weights():
    """Decoding under torch.inference_mode() (its tensors have no version counter); a model that decoded in bf16
    deep-copies and saves (the opaque packed tensors are left out); a weight replaced by a new tensor is packed
    anew and its old copy freed."""
    import copy
    import io

    model = bf16_model(4, seed=9)
    images, prompts = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)), [prompt_tokens(tok)] * 2
    greedy = generate(model, images, prompts, max_new_tokens=8)
    with torch.inference_mode():
        assert speculative_generate_batch(model, images, prompts, 8)[0] == greedy
        assert generate(model, images, prompts, max_new_tokens=8) == greedy
    assert packed_copies(model) > 0
    twin = copy.deepcopy(model)
    assert packed_copies(twin) == 0 and generate(twin, images, prompts, max_new_tokens=8) == greedy
    torch.save(model, io.BytesIO())
    lin = model.blocks[0].mlp[2]
    before = len(model.blocks[0].__dict__[packed.ATTR])
    lin.weight = nn.Parameter(lin.weight.detach().clone())  # a new tensor: a new copy, the old one freed
    assert generate(model, images, prompts, max_new_tokens=8) == greedy
    assert len(model.blocks[0].__dict__[packed.ATTR]) == before
