"""model.text_first_layers: in those blocks text sees no image token; everything else is as before, and
KV-cached, batched, ragged and speculative decoding stay exact.

    python -m pytest -q tests/test_text_first.py
"""

import pytest
import torch

from vlm_dist.config import ConfigError, load_config
from vlm_dist.infer.generate import generate
from vlm_dist.infer.speculative import speculative_generate_batch
from vlm_dist.model import VLM
from vlm_dist.text import get_tokenizer, prompt_tokens

tok = get_tokenizer()


def model(text_first: int, n_future: int = 2, attention: str = "sdpa", seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    overrides = [f"model.text_first_layers={text_first}", f"model.n_future={n_future}", "model.max_seq_len=64",
                 f"model.attention={attention}"]
    return VLM(load_config("tiny", overrides).model).eval()


def prompts(B):
    questions = [None, "what colour is the circle?", "what colour is the shape on the right?", "how many shapes are there?"]
    return [prompt_tokens(tok, questions[b % 4]) for b in range(B)]


def text_logits(m: VLM, images: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([prompt_tokens(tok, "what colour is the circle?")] * images.shape[0])
    with torch.no_grad():
        return m(images, ids)["logits"]  # (B, n_future, T, V) over the text positions


def test_text_in_every_blind_block_never_sees_the_image():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # tiny has 2 blocks: text never reads the image (an extra head's block would: n_future=1)
    blind = text_logits(model(text_first=2, n_future=1), images)
    assert torch.equal(blind[0], blind[1])
    seeing = text_logits(model(text_first=1, n_future=1), images)  # the second block reads it
    assert not torch.allclose(seeing[0], seeing[1])


def test_first_block_blind_changes_only_that_block():
    """The same weights with text_first 0 and 1 agree on the image positions (causal: they never see
    text) and differ on the text positions."""
    a, b = model(text_first=0), model(text_first=1)
    b.load_state_dict(a.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([prompt_tokens(tok, "how many shapes are there?")] * 2)
    with torch.no_grad():
        ha, hb = (m.trunk(m.embed(images, ids)) for m in (a, b))
    P = a.n_image_tokens
    torch.testing.assert_close(ha[:, :P], hb[:, :P], rtol=0, atol=0)
    assert not torch.allclose(ha[:, P:], hb[:, P:])


def test_sdpa_equals_explicit_attention():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(text_logits(model(1, attention="sdpa"), images),
                               text_logits(model(1, attention="explicit"), images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_future", [1, 3])
def test_cached_batched_and_speculative_decoding_equal_uncached(n_future):
    m = model(text_first=1, n_future=n_future, seed=n_future)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ps = prompts(4)  # ragged: a caption prompt and questions of different lengths
    uncached = generate(m, images, ps, max_new_tokens=10, use_cache=False)
    assert generate(m, images, ps, max_new_tokens=10) == uncached
    assert [generate(m, images[b:b + 1], [ps[b]], max_new_tokens=10)[0] for b in range(4)] == uncached
    rows, _ = speculative_generate_batch(m, images, ps, max_new_tokens=10)
    assert rows == uncached


def test_more_blind_blocks_than_blocks_is_a_clear_error():
    with pytest.raises(ConfigError, match="text_first_layers"):
        load_config("tiny", ["model.text_first_layers=3"])
