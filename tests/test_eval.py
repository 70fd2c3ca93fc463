"""Evaluation: scoring is consistent with exact match, the CLI writes COCO results, bad paths fail clearly."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import make_demo_shards
from vlm_dist.cli import app
from vlm_dist.config import load_config
from vlm_dist.infer.evaluate import coco_caption_scores, normalise
from vlm_dist.infer.export import save_export
from vlm_dist.model import VLM

runner = CliRunner()


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise(" A small red circle .") == normalise("a small  red circle") == "a small red circle"


def test_caption_scores_agree_with_exact_match():
    refs = {1: ["a small red circle on the left"], 2: ["a large blue square on the right"]}
    perfect = coco_caption_scores({1: "a small red circle on the left", 2: "A large blue square on the right."}, refs)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    wrong = coco_caption_scores({1: "a large green triangle on the right", 2: "a small yellow circle in the center"}, refs)
    assert wrong["BLEU-4"] < 0.1 and wrong["CIDEr"] < perfect["CIDEr"] and wrong["ROUGE-L"] < perfect["ROUGE-L"]


@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shards = make_demo_shards(root / "data", n_train=8, n_val=6, shard_size=4)
    torch.manual_seed(0)
    save_export(VLM(load_config("tiny").model).eval(), root / "export")
    return root, shards


def test_eval_cli_writes_metrics_and_coco_results(export_and_shards):
    root, shards = export_and_shards
    out = root / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(root / "export"), "--shards", str(shards / "val"),
                                 "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert m["images"] == 6 and m["captions"] == 6 and m["questions"] == len(data["predictions"]) - 6
    hits = sum(normalise(p["prediction"]) in map(normalise, p["refs"]) for p in data["predictions"] if p["question"] is None)
    assert m["caption_exact_match"] == hits / 6  # the reported figure is the predictions' own
    coco = json.loads((root / "eval_captions.json").read_text())
    assert len(coco) == 6 and set(coco[0]) == {"image_id", "caption"}
    assert "Q&A accuracy" in result.output and "CIDEr" in result.output


def test_eval_and_generate_errors_name_the_problem(export_and_shards, tmp_path):
    root, shards = export_and_shards
    bad_model = runner.invoke(app, ["eval", "--model", str(tmp_path), "--shards", str(shards / "val"), "--out", str(tmp_path / "x.json")])
    assert bad_model.exit_code == 2 and "is not a vlm-dist export" in bad_model.output
    bad_shards = runner.invoke(app, ["eval", "--model", str(root / "export"), "--shards", str(tmp_path / "none"),
                                     "--out", str(tmp_path / "x.json")])
    assert bad_shards.exit_code == 2 and str(tmp_path / "none") in bad_shards.output
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    bad_image = runner.invoke(app, ["generate", "--model", str(root / "export"), "--image", str(tmp_path / "bad.jpg")])
    assert bad_image.exit_code == 2 and "cannot read image" in bad_image.output


def test_generate_cli_greedy_and_speculative_agree(export_and_shards):
    root, _ = export_and_shards
    image = next((root / "data" / "images" / "val2017").glob("*.jpg"))
    args = ["generate", "--model", str(root / "export"), "--image", str(image), "--max-new-tokens", "6", "--json"]
    greedy = runner.invoke(app, args)
    spec = runner.invoke(app, [*args, "--speculative"])
    assert greedy.exit_code == 0 and spec.exit_code == 0, greedy.output + spec.output
    assert json.loads(greedy.output.strip().splitlines()[-1])["text"] == json.loads(spec.output.strip().splitlines()[-1])["text"]
