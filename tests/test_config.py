"""Config: presets validate, overrides parse, bad values and combinations name the field and the fix."""

import pytest

from vlm_dist.config import PRESETS, ConfigError, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = load_config(name)
    assert cfg.model.max_seq_len >= cfg.model.n_image_tokens + cfg.data.max_text_len - 1


def test_base_preset_is_the_seed_model():
    m = load_config("base").model
    assert (m.vision.model_name, m.n_layers, m.n_heads, m.d_model) == ("ViT-B-32", 24, 8, 768)
    assert m.n_image_tokens == 49


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["model.n_layers=4", "model.vision.freeze=true", "model.mtp_weights=[1, 0.5]",
                               "data.train_shards=a/b-{00000..00003}.tar"])
    assert cfg.model.n_layers == 4 and cfg.model.vision.freeze is True
    assert cfg.model.mtp_weights == [1.0, 0.5] and cfg.data.train_shards == "a/b-{00000..00003}.tar"


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  n_layers: 3\n")
    cfg = load_config(path, ["model.d_model=64"])
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 64 and cfg.model.vision.model_name == "vlm-tiny-vit"


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.n_heads=3", r"model: d_model=32 is not divisible by n_heads=3; set model.d_model"),
        ("model.n_layers=0", r"model.n_layers: Input should be greater than 0"),
        ("model.mtp_weights=[1.0]", r"mtp_weights has 1 entries but n_future=2"),
        ("data.max_text_len=64", r"model.max_seq_len=48 < 16 image tokens \+ data.max_text_len=64 - 1 = 79; raise model.max_seq_len to 79"),
        ("model.vision.model_name=ViT-Nope", r"model.vision.model_name: unknown open_clip model 'ViT-Nope'"),
        ("model.n_layer=4", r"model.n_layer: Extra inputs are not permitted \(unknown key"),
        ("model.attention=flash", r"model.attention: Input should be 'sdpa' or 'explicit'"),
        ("n_layers", r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", [override])


def test_unknown_preset_or_file():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("huge")
