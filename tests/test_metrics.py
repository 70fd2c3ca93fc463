"""The field's metrics on hand-made cases: VQA v2 accuracy (official normalisation, leave-one-out
subset average) and COCO caption scores through pycocoevalcap, with and without Java.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from vlm_dist.infer.metrics import (caption_scores, java_available, java_free_tokenize, normalize_vqa_answer,
                                    vqa_accuracy, write_caption_files)

needs_java = pytest.mark.skipif(not java_available(), reason="no `java` on PATH: the official PTB-tokenizer pipeline "
                                "cannot run (apt-get install default-jre-headless)")


def subset_definition(pred: str, answers: list[str]) -> float:
    """The VQA v2 definition written out directly: mean over all 10-choose-9 annotator subsets of
    min(#humans in the subset who gave the answer / 3, 1)."""
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    return sum(min(1.0, sum(answers[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n_agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_matches_the_subset_definition(n_agree, expected):
    answers = ["cat"] * n_agree + ["dog", "mouse", "bird", "fish", "cow", "pig", "hen", "owl", "fox", "elk"][: 10 - n_agree]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert vqa_accuracy("cat", answers) == pytest.approx(subset_definition("cat", answers))


def test_three_of_ten_is_full_credit_per_subset_but_averages_to_0_9():
    # min(#/3, 1) is 1.0 for 3 matching humans; averaged over the ten 9-annotator subsets (the official
    # score) the 3 subsets that drop one of them give 2/3 each: (7 x 1 + 3 x 2/3) / 10 = 0.9.
    answers = ["2"] * 3 + ["3"] * 7
    assert min(1.0, answers.count("2") / 3) == 1.0
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)  # 1 of 10 -> 0.3 after the average


def test_answer_normalisation_two():
    assert normalize_vqa_answer("Two") == normalize_vqa_answer("2") == normalize_vqa_answer("two.") == "2"
    for pred in ("Two", "2", "two.", " two\n"):
        assert vqa_accuracy(pred, ["2"] * 10) == 1.0
    assert vqa_accuracy("three", ["2"] * 10) == 0.0
    assert normalize_vqa_answer("A dog!") == "dog"  # article dropped, punctuation removed
    assert normalize_vqa_answer("dont") == "don't" and normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("3.5") == "3.5"  # a decimal point is not a period


def test_human_answers_are_punctuation_normalised_only_when_they_disagree():
    # The official script leaves unanimous answers as they are, so "yes." never matches there...
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # ...but cleans them when annotators disagree.
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    with pytest.raises(ValueError, match="annotators' answers"):
        vqa_accuracy("yes", ["yes"])


REFS = {1: ["a small red circle on the left"], 2: ["a large blue square on the right"],
        3: ["a small green triangle in the center"]}
PERFECT = {1: "a small red circle on the left", 2: "A large blue square on the right.", 3: "a small green triangle in the center"}
WRONG = {1: "a large green triangle on the right", 2: "a small yellow circle in the center", 3: "a large red square on the left"}


def test_java_free_tokenizer_is_labelled_and_perfect_scores_top():
    perfect = caption_scores(PERFECT, REFS, java=False)
    wrong = caption_scores(WRONG, REFS, java=False)
    assert perfect["tokenizer"] == "java-free" and "METEOR" not in perfect
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["CIDEr"] > wrong["CIDEr"] and wrong["BLEU-4"] < 0.1
    assert java_free_tokenize("A man's dog, isn't it? Yes.") == "a man 's dog is n't it yes"  # PTB's tokens


@needs_java
def test_official_pipeline_with_java_perfect_scores_top():
    perfect = caption_scores(PERFECT, REFS, java=True)
    wrong = caption_scores(WRONG, REFS, java=True, meteor=False)
    assert perfect["tokenizer"] == "ptb"
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["ROUGE-L"] == pytest.approx(1.0) and perfect["CIDEr"] > wrong["CIDEr"] and wrong["BLEU-4"] < 0.1
    # On these plain captions the Java-free tokens equal PTB's, so the scores agree exactly.
    free = caption_scores(PERFECT, REFS, java=False)
    assert all(free[k] == pytest.approx(perfect[k]) for k in ("BLEU-4", "ROUGE-L", "CIDEr"))


def test_results_file_loads_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    write_caption_files(PERFECT, REFS, tmp_path / "res.json", tmp_path / "ref.json")
    coco = COCO(str(tmp_path / "ref.json"))
    res = coco.loadRes(str(tmp_path / "res.json"))
    assert sorted(res.getImgIds()) == [1, 2, 3] and res.imgToAnns[2][0]["caption"] == PERFECT[2]
    assert json.loads((tmp_path / "res.json").read_text())[0] == {"image_id": 1, "caption": PERFECT[1]}


def test_caption_ids_must_be_integers():
    with pytest.raises(ValueError, match="integers"):
        caption_scores({"x": "a"}, {"x": ["a"]}, java=False)
