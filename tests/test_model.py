"""Model invariants on the tiny preset (fp32, CPU): causality, SDPA == explicit attention,
checkpointing == no checkpointing, cached == full forward, vision loading and freezing."""

import copy

import open_clip
import pytest
import torch

from vlm_dist.config import VisionConfig, load_config
from vlm_dist.model import VLM
from vlm_dist.model.decoder import Attention, explicit_attention
from vlm_dist.model.vision import VisionEncoder, _register_configs
from vlm_dist.text import IGNORE_INDEX, build_example, collate_examples, get_tokenizer, make_targets


def tiny_model(*overrides: str, seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    return VLM(load_config("tiny", ["model.n_future=3", *overrides]).model).eval()


def batch(model: VLM, B: int = 3, T: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vision.geometry["image_size"]
    images = torch.randn(B, 3, size, size, generator=g)
    ids = torch.randint(0, model.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, model.vocab_size, (B, model.cfg.n_future, T), generator=g)
    targets[:, :, :2] = IGNORE_INDEX  # like a prompt
    return images, ids, targets


def test_no_future_token_leakage_all_heads():
    model = tiny_model()
    images, ids, _ = batch(model)
    base = model(images, ids)["logits"]  # (B, n_future, T, V)
    T = ids.shape[1]
    for t in range(T):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(ids.shape[0])) % model.vocab_size
        logits = model(images, changed)["logits"]
        torch.testing.assert_close(logits[:, :, :t], base[:, :, :t], rtol=0, atol=1e-6)
        # ... while the changed position itself does see its new input, in every head.
        assert (logits[:, :, t] - base[:, :, t]).abs().amax(dim=-1).min() > 1e-4


def test_sdpa_equals_explicit_attention_module_and_model():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    ref = explicit_attention(q, k, v, mask)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max() <= 1e-5
    # Whole model: same weights, the two attention implementations.
    sdpa = tiny_model()
    explicit = tiny_model("model.attention=explicit")
    explicit.load_state_dict(sdpa.state_dict())
    images, ids, targets = batch(sdpa)
    a, b = sdpa(images, ids, targets, return_logits=True), explicit(images, ids, targets, return_logits=True)
    assert (a["logits"] - b["logits"]).abs().max() <= 1e-5
    assert abs(a["loss"].item() - b["loss"].item()) <= 1e-5


def test_cached_attention_with_prefix_matches_explicit():
    torch.manual_seed(0)
    attn = Attention(32, 4, 0.0, "sdpa").eval()
    ref = copy.deepcopy(attn)
    ref.kind = "explicit"
    x = torch.randn(2, 9, 32)
    full = ref(x)
    from vlm_dist.model.decoder import KVCache

    cache = KVCache(1, 2, 4, 8, 16, torch.float32, "cpu")
    first = attn(x[:, :4], cache, 0)
    cache.advance(4)
    rest = attn(x[:, 4:], cache, 0)  # 5 queries over a 4-position prefix: needs the offset causal mask
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-5


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    on = tiny_model("model.activation_checkpointing=true", "model.dropout=0.1").train()
    off = tiny_model("model.activation_checkpointing=false", "model.dropout=0.1").train()
    off.load_state_dict(on.state_dict())
    images, ids, targets = batch(on)
    results = []
    for model in (on, off):
        torch.manual_seed(123)  # same dropout masks; checkpointing must replay them in recompute
        loss = model(images, ids, targets)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_on, g_on), (loss_off, g_off) = results
    assert torch.equal(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and len(g_on) > 10
    for name in g_on:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=0, atol=1e-7, msg=name)


def test_compiled_regions_give_the_eager_loss_gradients_and_logits():
    """model.compile=true: the vision tower, the blocks' whole-sequence forward (one graph for the plain
    blocks, one for the block that hides the image) and the head loss's chunk kernels, compiled by inductor,
    give eager's loss, gradients (checkpointed) and logits to float reassociation, and so does cached
    decoding (its blocks stay eager); the state dict is the same."""
    overrides = ["model.text_first_layers=1", "model.activation_checkpointing=true"]
    eager, compiled = tiny_model(*overrides).train(), tiny_model(*overrides, "model.compile=true").train()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    assert all(b.compiled for b in [*compiled.blocks, *compiled.extra_heads.blocks]) and compiled.lm_head.fused
    assert compiled.vision.compiled and not compiled.vision.frozen  # the tiny tower trains: its backward compiles too
    images, ids, targets = batch(eager, T=12)
    out = []
    for model in (eager, compiled):
        loss = model(images, ids, targets)["loss"]
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, g_e), (loss_c, g_c) = out
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    assert g_e.keys() == g_c.keys() and len(g_e) > 10
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, ids)["logits"], eager(images, ids)["logits"], rtol=1e-5, atol=1e-5)
        steps = []
        for model in (eager, compiled):
            cache = model.new_cache(batch=ids.shape[0])
            steps.append([model.step(ids[:, :1], cache, images=images), model.step(ids[:, 1:4], cache)])
    for a, b in zip(*steps):  # decoding's blocks run eager; the prefill's image tokens come from the compiled tower
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_checkpoint_inside_the_graph_and_keep_only_their_inputs():
    """A compiled block under activation checkpointing runs torch.utils.checkpoint inside its compiled graph
    (decoder.checkpointed): backward recomputes the block, so what autograd keeps per block is its input
    alone, as eager checkpointing keeps, and far less than without checkpointing."""
    from vlm_dist.model.decoder import Block, checkpointed

    torch.manual_seed(0)
    blocks = [Block(64, 2, 4.0, 0.0, "sdpa") for _ in range(3)]
    params = {p.data_ptr() for b in blocks for p in b.parameters()}

    def kept_bytes(compiled: bool, ckpt: bool) -> int:
        for b in blocks:
            b.compiled = compiled
        total = 0

        def pack(t):
            nonlocal total
            total += 0 if t.data_ptr() in params else t.numel() * t.element_size()  # weights are not activations
            return t

        x = torch.randn(4, 24, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for b in blocks:
                h = checkpointed(b, h) if ckpt else b(h)
        h.square().sum().backward()
        return total

    inputs = 3 * 4 * 24 * 64 * 4  # each block's fp32 input
    kept_bytes(True, True)  # compile first: what compilation itself touches is not counted
    assert kept_bytes(False, True) == kept_bytes(True, True) == inputs
    assert kept_bytes(True, False) > 10 * inputs


@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_incremental_forward_equals_full_forward(chunk):
    model = tiny_model()
    images, ids, _ = batch(model, T=11)
    full = model(images, ids)["logits"]  # (B, n_future, T, V)
    cache = model.new_cache(batch=ids.shape[0])
    pieces = [model.step(ids[:, :1], cache, images=images)]
    for start in range(1, ids.shape[1], chunk):
        pieces.append(model.step(ids[:, start : start + chunk], cache))
    cached = torch.cat(pieces, dim=2)
    assert cached.shape == full.shape
    assert (cached - full).abs().max() <= 1e-5
    assert cache.length == model.n_image_tokens + ids.shape[1]


def test_loss_uses_only_valid_targets_and_matches_cross_entropy():
    model = tiny_model("model.n_future=1")
    tok = get_tokenizer()
    examples = [build_example(tok, "a red circle on the left", 24), build_example(tok, "blue", 24, question="what colour?")]
    tokens, mask = collate_examples(examples, tok.pad_id)
    ids, targets = make_targets(tokens, mask, 1)
    images = torch.randn(2, 3, 32, 32)
    out = model(images, ids, targets, return_logits=True)
    # Reference: per-sample mean CE over the loss-masked next tokens, then mean over samples.
    logp = out["logits"][:, 0].log_softmax(-1)
    per_sample = []
    for b in range(2):
        pos = [j for j in range(ids.shape[1]) if mask[b, j + 1]]
        per_sample.append(-torch.stack([logp[b, j, tokens[b, j + 1]] for j in pos]).mean())
    torch.testing.assert_close(out["loss"], torch.stack(per_sample).mean())


def test_mtp_loss_weights_combine_head_losses():
    model = tiny_model("model.mtp_weights=[1.0, 0.5, 0.25]")
    images, ids, targets = batch(model)
    out = model(images, ids, targets)
    expected = (out["head_losses"] * torch.tensor([1.0, 0.5, 0.25])).sum()
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert out["head_losses"].shape == (3,)


def test_tied_embeddings_share_storage():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny_model("model.tie_embeddings=false")
    assert untied.lm_head.weight is not untied.tok_emb.weight


def _open_clip_checkpoint(tmp_path, prefix=""):
    _register_configs()
    torch.manual_seed(7)
    clip = open_clip.create_model("vlm-tiny-vit")
    path = tmp_path / "epoch_1.pt"
    # The layout open_clip_train writes: {"epoch", "name", "state_dict"}, keys "module."-prefixed under DDP.
    torch.save({"epoch": 1, "name": "x", "state_dict": {prefix + k: v for k, v in clip.state_dict().items()}}, path)
    return clip, path


@pytest.mark.parametrize("prefix", ["", "module."])
def test_vision_checkpoint_saved_by_open_clip_loads_exactly(tmp_path, prefix):
    clip, path = _open_clip_checkpoint(tmp_path, prefix)
    enc = VisionEncoder(VisionConfig(model_name="vlm-tiny-vit", pretrained=str(path)))
    expected = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
    loaded = enc.tower.state_dict()
    assert loaded.keys() == expected.keys()
    for k in expected:
        assert torch.equal(loaded[k], expected[k]), k
    # and differs from a fresh random init (the load did something)
    torch.manual_seed(0)
    fresh = VisionEncoder(VisionConfig(model_name="vlm-tiny-vit", freeze=False)).tower.state_dict()
    assert not torch.equal(fresh["conv1.weight"], loaded["conv1.weight"])


def test_missing_vision_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="local open_clip checkpoint"):
        VisionEncoder(VisionConfig(model_name="vlm-tiny-vit", pretrained=str(tmp_path / "nope.pt")))


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_encoder_gets_no_gradient_trainable_does(freeze):
    model = tiny_model(f"model.vision.freeze={str(freeze).lower()}").train()
    images, ids, targets = batch(model)
    model(images, ids, targets)["loss"].backward()
    vision_grads = [p.grad for p in model.vision.parameters()]
    if freeze:
        assert all(g is None for g in vision_grads)
        assert all(not p.requires_grad for p in model.vision.parameters())
    else:
        assert all(g is not None for g in vision_grads)
        assert sum(g.abs().sum() for g in vision_grads) > 0
    assert model.projector.weight.grad.abs().sum() > 0


def test_base_preset_builds_with_parameter_count(capsys):
    cfg = load_config("base", ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"]).model
    model = VLM(cfg)
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    with capsys.disabled():
        print(f"\nbase preset: {n_total / 1e6:.1f}M parameters ({n_vision / 1e6:.1f}M vision tower, "
              f"{len(model.blocks)} blocks x {cfg.n_heads} heads x {cfg.d_model}, {cfg.n_future} heads)")
    assert len(model.blocks) == 24 and cfg.n_heads == 8
    assert model.blocks[0].attn.n_heads == 8
    assert 87.0e6 < n_vision < 88.0e6  # ViT-B-32 tower without the CLIP projection
    assert model.n_image_tokens == 49
