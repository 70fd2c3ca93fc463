"""The in-training generation eval measures learning: a tiny model trained for a few dozen steps scores
clearly above the same model untrained (same seed, same weights at step 0) on the metrics it logs.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_eval_learning.py
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_demo_shards, metrics, run_ranks
from vlm_dist.config import load_config
from vlm_dist.infer.evaluate import evaluate_generation
from vlm_dist.model import VLM

pytestmark = pytest.mark.slow  # one trainer process: ~10 s start-up + ~10 s of training

STEPS = 120


def test_generation_metrics_rise_from_the_untrained_model(tmp_path):
    shards = make_demo_shards(tmp_path / "data", n_train=128, n_val=8)
    run_ranks(["--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(shards / "train"),
               "--val-shards", str(shards / "val"), "--run-dir", str(tmp_path / "run"), "--max-steps", str(STEPS),
               "--ds-set", "bf16.enabled=false", "--ds-set", "train_micro_batch_size_per_gpu=16",
               "--ds-set", "optimizer.params.lr=0.01", "--ds-set", "scheduler.params.warmup_num_steps=10",
               "--set", "data.resampled=true",  # no epoch ends: no extra evals and checkpoints
               "--set", f"train.generate_every={STEPS // 2}", "--set", "train.generate_images=8",
               "--set", "train.eval_every=1000", "--save-every", "1000", "--set", "log.grad_stats_every=0",
               "--set", "log.histograms_every=0"], world=1)
    cfg = load_config("tiny")
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights (setup() seeds the same way)
    untrained = evaluate_generation(VLM(cfg.model), str(shards / "val"), limit=8, progress=False, meteor=False,
                                    java=False)["metrics"]
    logged = metrics(tmp_path / "run", "val_generate")
    assert [r["step"] for r in logged] == [STEPS // 2, STEPS]
    last = logged[-1]
    assert last["images"] == untrained["images"] == 8 and last["captions"] == 8
    # Untrained: word salad (BLEU-1 ~0, no right answer); trained: the caption template and some answers.
    assert last["BLEU-1"] > untrained["BLEU-1"] + 0.3, (untrained["BLEU-1"], last["BLEU-1"])
    assert last["CIDEr"] > untrained["CIDEr"]
    assert last["qa_accuracy"] > untrained["qa_accuracy"] + 0.1, (untrained["qa_accuracy"], last["qa_accuracy"])
    assert "qa_accuracy_how_many" in last and "qa_vqa_accuracy" in last  # per type and official VQA, logged
