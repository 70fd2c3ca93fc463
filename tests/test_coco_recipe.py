"""launch/coco_base.sh end to end on a synthetic COCO-shaped folder (train2014/, val2014/, LAVIS Karpathy
files, VQA v2 train2014 files): shard-coco with resize -> `vlm-dist train --num-gpus 2` (two CPU ranks,
tiny preset) -> export -> eval on the Karpathy test split.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_coco_recipe.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, losses, train_env
from vlm_dist.data.demo import make_demo_data

pytestmark = pytest.mark.slow
N_TRAIN, N_VAL, N_TEST = 32, 8, 8


def make_coco(root: Path) -> Path:
    """The demo set laid out like COCO 2014 + LAVIS's Karpathy splits + VQA v2 (64 px images, so that
    the recipe's resize to the tiny tower's 32 px has work to do)."""
    splits = make_demo_data(root / "src", n_train=N_TRAIN, n_val=N_VAL + N_TEST, seed=1, side=64)
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "vqa").mkdir()
    karpathy = {"train": [], "val": [], "test": []}
    for split, folder in [("train", "train2014"), ("val", "val2014")]:
        paths = splits[split]
        anns = json.loads(paths["captions"].read_text())
        caps: dict[int, list[str]] = {}
        for a in anns["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        (coco / folder).mkdir()
        for n, img in enumerate(sorted(anns["images"], key=lambda i: i["id"])):
            name = f"{folder}/COCO_{folder}_{img['id']:012d}.jpg"
            (coco / name).write_bytes((paths["images"] / img["file_name"]).read_bytes())
            if split == "train":  # LAVIS train file: one entry per caption, ids as "coco_N"
                karpathy["train"] += [{"image": name, "caption": c, "image_id": f"coco_{img['id']}"}
                                      for c in caps[img["id"]]]
            else:  # val / test: one entry per image with all its captions (both from val2014)
                karpathy["val" if n < N_VAL else "test"].append({"image": name, "caption": caps[img["id"]]})
    for split, entries in karpathy.items():
        (coco / "annotations" / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
    (coco / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").write_bytes(
        splits["train"]["vqa_questions"].read_bytes())
    (coco / "vqa" / "v2_mscoco_train2014_annotations.json").write_bytes(splits["train"]["vqa_annotations"].read_bytes())
    return coco


def test_coco_recipe_end_to_end(tmp_path):
    coco = make_coco(tmp_path)
    run_dir = tmp_path / "run"
    env = train_env(COCO=str(coco), CONFIG="tiny", NUM_GPUS="2", RUN_DIR=str(run_dir), WORKERS="1",
                    MASTER_PORT=str(free_port()), VLM_DIST=f"{sys.executable} -m vlm_dist.cli")
    r = subprocess.run(["bash", "launch/coco_base.sh", "--max-steps", "4", "--eval-every", "2", "--save-every", "100",
                        "--ds-set", "train_micro_batch_size_per_gpu=4", "--ds-set", "bf16.enabled=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    shards = coco / "shards"
    for split, n in [("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)]:
        manifest = json.loads((shards / split / "manifest.json").read_text())
        assert manifest["totals"]["samples"] == n and manifest["options"]["resize"] == 32, manifest
    train = json.loads((shards / "train" / "manifest.json").read_text())["totals"]
    assert train["qa"] > 0  # VQA v2 train questions joined onto the Karpathy train images
    summary = json.loads((shards / "train" / "summary.json").read_text())
    assert summary["resized"] == N_TRAIN  # 64 px images down to the tiny tower's 32 px
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    assert "world size 2 on cpu" in r.stdout + r.stderr
    assert (run_dir / "export" / "model.safetensors").is_file()
    result = json.loads((run_dir / "eval_karpathy_test.json").read_text())
    assert result["metrics"]["images"] == N_TEST and result["metrics"]["captions"] == N_TEST
    assert result["metrics"]["questions"] == 0  # Karpathy test has captions only
    assert "caption exact match" in r.stdout


def test_coco_recipe_on_precomputed_tower_features(tmp_path):
    """FEATURES=1: the frozen tower's features for train and val (with the trainer's --set model.* options),
    training and validation on them, then the export scored on the Karpathy test images."""
    coco = make_coco(tmp_path)
    run_dir = tmp_path / "run"
    env = train_env(COCO=str(coco), CONFIG="tiny", NUM_GPUS="2", RUN_DIR=str(run_dir), WORKERS="1", FEATURES="1",
                    MASTER_PORT=str(free_port()), VLM_DIST=f"{sys.executable} -m vlm_dist.cli")
    r = subprocess.run(["bash", "launch/coco_base.sh", "--max-steps", "2", "--eval-every", "2", "--save-every", "100",
                        "--set", "model.vision.freeze=true", "--ds-set", "train_micro_batch_size_per_gpu=4",
                        "--ds-set", "bf16.enabled=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    for split, n in [("train", N_TRAIN), ("val", N_VAL)]:
        manifest = json.loads((coco / "shards" / f"features_{split}" / "manifest.json").read_text())
        assert sum(s["samples"] for s in manifest["shards"]) == n and manifest["features"]["model_name"] == "vlm-tiny-vit"
    assert "train shards hold precomputed tower features" in r.stdout + r.stderr
    got = losses(run_dir)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
    result = json.loads((run_dir / "eval_karpathy_test.json").read_text())
    assert result["metrics"]["images"] == N_TEST
