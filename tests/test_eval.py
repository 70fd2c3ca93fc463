"""Evaluation: scoring is consistent with exact match, the CLI writes COCO results that pycocotools loads,
per question type; too-long questions are counted, missing image ids and bad paths fail clearly."""

import io
import json
import tarfile

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import demo_export
from vlm_dist.cli import app
from vlm_dist.config import load_config
from vlm_dist.data.demo import make_demo_data
from vlm_dist.data.shard import shard_coco
from vlm_dist.infer.evaluate import evaluate_generation, normalise
from vlm_dist.model import VLM

runner = CliRunner()


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise(" A small red circle .") == normalise("a small  red circle") == "a small red circle"


@pytest.fixture(scope="module")
def export_and_shards(module_dir):
    return demo_export(module_dir("eval"), n_train=8, n_val=6)


def test_eval_cli_writes_metrics_and_coco_results(export_and_shards):
    root, shards = export_and_shards
    out = root / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(root / "export"), "--shards", str(shards / "val"),
                                 "--out", str(out), "--batch-size", "4", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert m["images"] == 6 and m["captions"] == 6 and m["questions"] == len(data["predictions"]) - 6
    hits = sum(normalise(p["prediction"]) in map(normalise, p["refs"]) for p in data["predictions"] if p["question"] is None)
    assert m["caption_exact_match"] == hits / 6  # the reported figure is the predictions' own
    qas = [p for p in data["predictions"] if p["question"] is not None]
    assert len(qas[0]["answers"]) == 10  # all ten annotator answers reach the scorer (VQA accuracy)
    assert m["qa_vqa_accuracy"] == pytest.approx(sum(p["vqa_accuracy"] for p in qas) / len(qas))
    assert set(m["by_type"]) == {"how many", "what shape", "what colour", "what size"}
    assert sum(e["questions"] for e in m["by_type"].values()) == m["questions"]
    from vlm_dist.text import get_tokenizer

    assert all(len(get_tokenizer().encode(p["prediction"])) <= 5 for p in data["predictions"])  # --max-new-tokens
    from pycocotools.coco import COCO

    coco = COCO(str(root / "eval_captions_ref.json")).loadRes(str(root / "eval_captions.json"))
    assert len(coco.getImgIds()) == 6 and set(coco.anns[1]) >= {"image_id", "caption"}
    assert "VQA accuracy" in result.output and "CIDEr" in result.output and "'what shape'" in result.output


def test_too_long_question_is_counted_not_a_crash(tmp_path):
    paths = make_demo_data(tmp_path / "d", n_train=1, n_val=3, side=32)["val"]
    qs = json.loads(paths["vqa_questions"].read_text())
    qs["questions"][0]["question"] = "what colour is " + "the very large shape on the left of the picture " * 4 + "?"
    paths["vqa_questions"].write_text(json.dumps(qs))
    shard_coco(paths["images"], [paths["captions"]], tmp_path / "shards", vqa_questions=paths["vqa_questions"],
               vqa_annotations=paths["vqa_annotations"], split="val", progress=False)
    torch.manual_seed(0)
    model = VLM(load_config("tiny").model).eval()  # 48 positions - 16 image tokens: the prompt cannot fit
    result = evaluate_generation(model, str(tmp_path / "shards"), progress=False, java=False)
    m, preds = result["metrics"], result["predictions"]
    assert m["questions_too_long"] == 1 and m["questions"] == len(preds) - 3
    long = [p for p in preds if p.get("too_long")]
    assert len(long) == 1 and long[0]["prediction"] == "" and long[0]["exact_match"] == 0.0
    assert sum(not p["too_long"] for p in preds) == len(preds) - 1  # every other caption and question was decoded


def test_question_types_whose_names_slug_alike_keep_their_own_metric_keys():
    """"what color" (2 of 2 right) and "what-color" (0 of 1) slug to the same key; each keeps its own number."""
    from vlm_dist.infer.evaluate import score

    def qa(kind, prediction):
        return {"key": kind + prediction, "question": "?", "type": kind, "prediction": prediction, "refs": ["red"],
                "answers": [], "too_long": False}

    m = score([qa("what color", "red"), qa("what color", "red"), qa("what-color", "blue")], meteor=False, java=False)
    assert m["by_type"]["what color"]["exact_match"] == 1.0 and m["by_type"]["what-color"]["exact_match"] == 0.0
    assert m["qa_accuracy_what_color"] == 1.0 and m["qa_accuracy_what_color_2"] == 0.0  # sorted names: " " < "-"


def test_decode_tokens_per_s_counts_the_tokens_decoded(tmp_path, monkeypatch):
    """A row cut at its token budget decoded no end token: decode_tokens_per_s counts each row's ids plus the end
    token of a row that ended before its budget (over a clock that reads 0 then 1 s), not one more per row."""
    import itertools
    import types

    import vlm_dist.infer.evaluate as ev
    import vlm_dist.infer.generate as gen
    from tests.helpers import make_demo_shards
    from vlm_dist.text import get_tokenizer

    shards = make_demo_shards(tmp_path, n_train=1, n_val=6, shard_size=6) / "val"
    torch.manual_seed(0)
    model = VLM(load_config("tiny").model).eval()
    with torch.no_grad():  # the end token likelier than a random model makes it, so that some rows end early
        model.lm_head.weight[get_tokenizer().eos_id] *= 40
    decoded, cut, rows, plain = [0], [0], [0], gen.generate

    def counting(model, images, prompts, max_new_tokens=32, **kw):
        outs = plain(model, images, prompts, max_new_tokens=max_new_tokens, **kw)
        decoded[0] += sum(len(ids) + (len(ids) < max_new_tokens) for ids in outs)
        cut[0] += sum(len(ids) == max_new_tokens for ids in outs)
        rows[0] += len(outs)
        return outs

    monkeypatch.setattr(gen, "generate", counting)
    clock = itertools.count()
    monkeypatch.setattr(ev, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    m = evaluate_generation(model, str(shards), max_new_tokens=6, progress=False, java=False)["metrics"]
    assert m["decode_tokens_per_s"] == decoded[0]
    assert 0 < cut[0] < rows[0]  # rows cut (the old count added a token each) and rows that ended


def test_eval_of_a_model_in_training_rebuilds_its_argmax_table_once(tmp_path, monkeypatch):
    """The trainer's generation eval decodes a model in training mode, whose weights ZeRO wrote through
    .data: evaluate_generation drops the decode caches once, decodes every batch in eval mode with the
    rebuilt table (the same predictions as an eval-mode model) and hands the model back in training mode,
    without its decode caches (later ZeRO steps would make them stale; packed weights would take memory)."""
    import vlm_dist.model.vlm as vlm_module

    paths = make_demo_data(tmp_path / "d", n_train=1, n_val=3, side=32)["val"]
    shard_coco(paths["images"], [paths["captions"]], tmp_path / "shards", vqa_questions=paths["vqa_questions"],
               vqa_annotations=paths["vqa_annotations"], split="val", progress=False)
    torch.manual_seed(0)
    model = VLM(load_config("tiny").model).eval()
    kw = dict(progress=False, java=False, meteor=False, batch_size=2, max_new_tokens=4)
    want = [p["prediction"] for p in evaluate_generation(model, str(tmp_path / "shards"), **kw)["predictions"]]
    with torch.no_grad():
        model.lm_head.weight.data.mul_(-1)  # as a ZeRO step writes: same storage, no version bump
    built = []
    real = vlm_module.CertifiedArgmax
    monkeypatch.setattr(vlm_module, "CertifiedArgmax", lambda W: built.append(1) or real(W))
    model.train()
    got = [p["prediction"] for p in evaluate_generation(model, str(tmp_path / "shards"), **kw)["predictions"]]
    assert model.training and len(built) == 1  # several batches, one table, from the new weights
    assert getattr(model, "_argmax", None) is None  # nothing decode-made stays with a model that trains on
    model.eval()
    again = [p["prediction"] for p in evaluate_generation(model, str(tmp_path / "shards"), **kw)["predictions"]]
    assert got == again and len(built) == 2  # an eval-mode model builds its table ...
    evaluate_generation(model, str(tmp_path / "shards"), **kw)
    assert len(built) == 2  # ... and keeps it
    assert got != want  # the flipped unembedding changed the greedy tokens: the old table was not used


def test_sample_without_image_id_is_an_error(export_and_shards, tmp_path):
    root, shards = export_and_shards
    src = sorted((shards / "val").glob("*.tar"))[0]
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "manifest.json").write_bytes((shards / "val" / "manifest.json").read_bytes())
    for other in sorted((shards / "val").glob("*.tar"))[1:]:
        (tmp_path / "val" / other.name).write_bytes(other.read_bytes())
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "val" / src.name, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".json"):
                meta = json.loads(data)
                meta.pop("image_id")
                data = json.dumps(meta).encode()
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    res = runner.invoke(app, ["eval", "--model", str(root / "export"), "--shards", str(tmp_path / "val"),
                              "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "no integer image_id" in res.output


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
