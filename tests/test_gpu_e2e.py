"""tools/gpu_e2e.sh, the shipped path that a GPU session runs in its few minutes, on the CPU at the tiny preset:
demo data -> precompute-features -> training on the features (validation, generation eval, a save) -> export
-> eval greedy and speculative, with the static decoding steps (FIRST=--static: a GPU's default) and with
--dynamic, which must agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port, train_env

pytestmark = pytest.mark.slow


def test_gpu_e2e_script_runs_the_shipped_path_and_compares_the_decoders(tmp_path):
    env = train_env(W=str(tmp_path), CONFIG="tiny", FIRST="--static", STEPS="2", N_TRAIN="32", N_VAL="4", MASTER_PORT=str(free_port()),
                    VLM_DIST=f"{sys.executable} -m vlm_dist.cli")
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_e2e.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    none = "{'eval_speculative_first': 0, 'eval_greedy_dynamic': 0, 'eval_speculative_dynamic': 0}"
    assert f"differing from eval_greedy_first: {none}" in res.stderr  # static and dynamic steps, greedy and speculative
    record = json.loads((tmp_path / "features" / "train" / "manifest.json").read_text())["features"]
    assert record["tokens"] > 0 and record["model_name"]  # the trainer ran on tower features
    assert "step 2: caption exact match" in res.stdout + res.stderr  # the in-training generation eval ran
    spec = json.loads((tmp_path / "eval_speculative_first.json").read_text())["metrics"]["speculative"]
    assert spec["tokens"] > 0 and len(spec["accepted_per_position"]) > 1
    assert "[e2e] generate, speculative sampling:" in res.stderr and "tokens per model call" in res.stderr
    # a second run into the same folder would resume the finished training and check nothing: refused
    again = subprocess.run(["bash", str(REPO / "tools" / "gpu_e2e.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "holds an earlier run" in again.stderr, again.stderr[-2000:]
