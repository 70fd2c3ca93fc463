"""`vlm-dist generate` with default flags works on every preset's export: --max-new-tokens is lowered to
what the model's context holds (with a note), and the output equals generation at that length.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_generate_defaults.py
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlm_dist.cli import app
from vlm_dist.config import PRESETS, load_config
from vlm_dist.infer.export import save_export
from vlm_dist.infer.generate import fit_max_new_tokens, generate_text
from vlm_dist.infer.load import load_exported
from vlm_dist.model import VLM
from vlm_dist.text import get_tokenizer, prompt_tokens

DEFAULT = 32  # the CLI's --max-new-tokens default
# The `base` export is 317M parameters (1.3 GB in fp32): too big to write in a unit test. Its config is
# checked through the same clamp function below, and the export path is the same code as tiny/demo.
EXPORTED = ["tiny", "demo"]


@pytest.fixture(scope="module")
def image(module_dir):
    path = module_dir("img") / "shape.jpg"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


@pytest.fixture(scope="module", params=EXPORTED)
def export_dir(request, module_dir):
    torch.manual_seed(0)
    out = module_dir(request.param) / "export"
    save_export(VLM(load_config(request.param).model).eval(), out)  # random weights: shapes are what matter
    return out


def test_every_preset_is_covered():
    assert set(EXPORTED) | {"base"} == set(PRESETS)


def _expected(export_dir, image, question):
    model, cfg = load_exported(export_dir)
    n, note = fit_max_new_tokens(cfg, len(prompt_tokens(get_tokenizer(), question)), DEFAULT)
    from vlm_dist.data.samples import ImageToTensor

    img = ImageToTensor(cfg.vision.geometry["image_size"])(image.read_bytes())[None]
    return n, note, generate_text(model, img, [question], max_new_tokens=n)[0]


@pytest.mark.parametrize("question", [None, "what colour is the shape?"])
def test_generate_default_flags(export_dir, image, question):
    args = ["generate", "--model", str(export_dir), "--image", str(image), "--json"]
    if question:
        args += ["--question", question]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    n, note, text = _expected(export_dir, image, question)
    assert json.loads(r.stdout.strip().splitlines()[-1])["text"] == text
    if note is None:
        assert "lowered" not in r.stderr
    else:
        assert note in r.stderr and n < DEFAULT


def test_speculative_default_flags(export_dir, image):
    r = CliRunner().invoke(app, ["generate", "--model", str(export_dir), "--image", str(image), "--speculative"])
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)


def test_clamp_is_the_context_room():
    tiny = load_config("tiny").model  # 48 positions, 16 image tokens, 2 heads
    assert fit_max_new_tokens(tiny, 1, 32) == (31, "note: max new tokens 32 lowered to 31: the model's context "
                                                    "(max_seq_len=48) holds 16 image tokens + a 1-token prompt + 31 new tokens")
    assert fit_max_new_tokens(tiny, 1, 8) == (8, None)
    base = load_config("base").model  # 128 positions, 49 image tokens: the default fits as it is
    assert fit_max_new_tokens(base, 1, DEFAULT) == (DEFAULT, None)
    assert fit_max_new_tokens(base, 20, 100)[0] == 128 - 49 - 20
    with pytest.raises(ValueError, match="no room to generate"):
        fit_max_new_tokens(tiny, 32, 4)
