"""demo-data: deterministic, in the published formats, and its captions / answers match the pixels.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_data_demo.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_dist.cli import app
from vlm_dist.data.demo import COLOURS, X_OF, make_demo_data, questions

CAPTION = re.compile(r"a (small|large) (red|green|blue|yellow) (circle|square|triangle) (?:on the|in the) (left|center|right)")


@pytest.fixture(scope="module")
def demo(module_dir) -> Path:
    out = module_dir("demo")
    make_demo_data(out, n_train=60, n_val=10, seed=3)
    return out


def parse_caption(text: str) -> list[dict]:
    parts = text.split(" and ")
    scene = [dict(zip(("size", "colour", "kind", "position"), CAPTION.fullmatch(p).groups())) for p in parts]
    assert CAPTION.fullmatch(parts[0]) and len(scene) in (1, 2)
    return scene


def measure(img: np.ndarray, x0: int, x1: int) -> dict:
    """Kind / colour / size / position of the one shape in columns [x0, x1), from its pixels alone."""
    region = img[:, x0:x1].astype(float)
    bg = img[0, 0].astype(float)
    diff = np.abs(region - bg).max(axis=2)
    mask = diff > diff.max() / 2  # (H, W) shape pixels: edges blurred by JPEG count when over half-way
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    fill = mask.sum() / (h * w)  # square ~1, circle ~pi/4, triangle ~1/2
    kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"  # fill of the bounding box
    mean = region[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
    side = img.shape[1]
    half = max(h, w) / 2 / side  # the generator's half-width (a square fills the circle's bounding box)
    cx = (x0 + xs.mean()) / side
    return {"kind": kind, "colour": colour, "size": "small" if half < 0.165 else "large",
            "position": min(X_OF, key=lambda p: abs(X_OF[p] - cx))}


def test_captions_and_answers_describe_the_pixels(demo):
    caps = json.loads((demo / "annotations" / "captions_train2017.json").read_text())
    qs = json.loads((demo / "annotations" / "v2_OpenEnded_mscoco_train2017_questions.json").read_text())["questions"]
    answers = {a["question_id"]: a for a in
               json.loads((demo / "annotations" / "v2_mscoco_train2017_annotations.json").read_text())["annotations"]}
    names = {im["id"]: im["file_name"] for im in caps["images"]}
    assert len(caps["images"]) == 60 and len(caps["annotations"]) == 60  # one canonical caption per image
    words: set[str] = set()
    for ann in caps["annotations"]:
        scene = parse_caption(ann["caption"])
        words |= set(ann["caption"].split())
        img = np.asarray(Image.open(demo / "images" / "train2017" / names[ann["image_id"]]).convert("RGB"))
        side = img.shape[1]
        halves = [(0, side)] if len(scene) == 1 else [(0, side // 2), (side // 2, side)]
        assert [measure(img, *h) for h in halves] == scene, ann["caption"]
        got = sorted((q["question"], answers[q["question_id"]]["multiple_choice_answer"])
                     for q in qs if q["image_id"] == ann["image_id"])
        assert got == sorted(questions(scene))
    assert len(words) <= 20  # a modest vocabulary the demo model can learn


def test_deterministic_given_the_seed(tmp_path, demo):
    make_demo_data(tmp_path / "again", n_train=60, n_val=10, seed=3)
    make_demo_data(tmp_path / "other", n_train=60, n_val=10, seed=4)
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert len(files) == 70 + 6
    assert all((tmp_path / "again" / f).read_bytes() == (demo / f).read_bytes() for f in files)
    caps = "annotations/captions_train2017.json"
    assert (tmp_path / "other" / caps).read_bytes() != (demo / caps).read_bytes()
    val = json.loads((demo / "annotations" / "captions_val2017.json").read_text())
    train_ids = {im["id"] for im in json.loads((demo / caps).read_text())["images"]}
    assert not train_ids & {im["id"] for im in val["images"]}


def test_demo_data_cli_shards_through_shard_coco(tmp_path):
    res = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--train", "30", "--val", "5", "--shard"])
    assert res.exit_code == 0, res.output
    for split, n in (("train", 30), ("val", 5)):
        manifest = json.loads((tmp_path / "shards" / split / "manifest.json").read_text())
        assert manifest["split"] == split and manifest["totals"]["samples"] == n and manifest["totals"]["rejected"] == 0
