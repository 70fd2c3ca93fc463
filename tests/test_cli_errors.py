"""Ordinary mistakes and damaged files give one `error:` line and exit 2, never a traceback (the README's promise
for expected failures): damaged evaluation shards, an --out that is a folder, an empty question, an image too
large to decode, malformed YAML, a misspelt ZeRO key, --stop-after 0."""

import shutil
import tarfile

import pytest
from typer.testing import CliRunner

from tests.helpers import demo_export
from vlm_dist.cli import app
from vlm_dist.config import ConfigError, load_config
from vlm_dist.data.tario import TarWriter

runner = CliRunner()


@pytest.fixture(scope="module")
def export_and_shards(module_dir):
    return demo_export(module_dir("cli_errors"))


def one_error(res, *expected: str) -> None:
    """Exit 2, an `error:` line with each expected fragment, no traceback."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert "Traceback" not in res.output and "error:" in res.output, res.output
    for text in expected:
        assert text in res.output, res.output


def rewrite(tar_path, change) -> None:
    """Rewrite a tar with change(name, data) -> data for each member."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with TarWriter(tar_path) as w:
        for name, data in members:
            w.add(name, change(name, data))


def test_eval_names_a_damaged_shard_and_checks_out_first(export_and_shards, tmp_path):
    root, shards = export_and_shards
    tar = next((shards / "val").glob("*.tar"))
    first = sorted(tarfile.open(tar).getnames())[0].split(".")[0]

    def evaluate(name, change=None, cut=False, out=None):
        folder = tmp_path / name
        shutil.copytree(shards / "val", folder)
        if change is not None:
            rewrite(folder / tar.name, change)
        if cut:
            (folder / tar.name).write_bytes((folder / tar.name).read_bytes()[: tar.stat().st_size // 2])
        return runner.invoke(app, ["eval", "--model", str(root / "export"), "--shards", str(folder),
                                   "--out", str(out or tmp_path / f"{name}.json")])

    one_error(evaluate("html", lambda n, d: b"<html>404</html>" if n == f"{first}.jpg" else d),
              f"sample '{first}': its image does not decode (UnidentifiedImageError")
    one_error(evaluate("json", lambda n, d: b"\xff\xff" if n == f"{first}.json" else d),
              f"sample {first} of", "its .json is not valid JSON")
    one_error(evaluate("cut", cut=True), f"{tar.name} is damaged after")
    (tmp_path / "a_folder").mkdir()
    one_error(evaluate("fine", out=tmp_path / "a_folder"), "is a directory; give a file name")
    assert not (tmp_path / "a_folder" / "eval.json").exists()


def test_generate_refuses_an_empty_question_and_an_image_too_large(export_and_shards, monkeypatch):
    root, _ = export_and_shards
    image = next((root / "data" / "images" / "val2017").glob("*.jpg"))
    base = ["generate", "--model", str(root / "export"), "--image", str(image)]
    one_error(runner.invoke(app, [*base, "--question", "  "]), "--question is empty")
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32 x 32 image is then a "decompression bomb"
    one_error(runner.invoke(app, base), f"cannot read image {image}: DecompressionBombError")


def test_malformed_yaml_misspelt_zero_keys_and_stop_after_zero_are_config_errors(tmp_path):
    from vlm_dist.train.dsconfig import load_ds_config
    from vlm_dist.train.entry import parse_args

    with pytest.raises(ConfigError, match=r"override 'model.mtp_weights=\[1': the value is not valid YAML"):
        load_config("tiny", ["model.mtp_weights=[1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"zero_optimization.stag: .*unknown key: check its spelling"):
        load_ds_config("ds_configs/zero2.json", ["zero_optimization.stag=3"])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage: Input should be 0, 1, 2, 3"):
        load_ds_config("ds_configs/zero2.json", ["zero_optimization.stage=5"])
    with pytest.raises(SystemExit):
        parse_args(["--stop-after", "0"])
    res = runner.invoke(app, ["config", "show", "tiny", "--set", "model.mtp_weights=[1"])
    assert res.exit_code == 2 and "not valid YAML" in res.output and "Traceback" not in res.output
