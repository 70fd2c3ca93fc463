"""`vlm-dist train`: the trainer's flags, passed through unchanged; refusals exit 2 with one message.
(Training through it on two ranks runs in tests/test_coco_recipe.py.)

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_cli_train.py
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.helpers import REPO, losses, make_demo_shards, train_env
from vlm_dist.cli import app, trainer_argv
from vlm_dist.train.entry import parse_args


def _long_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


def test_train_command_has_every_trainer_flag():
    trainer = subprocess.run([sys.executable, "-m", "vlm_dist.train", "--help"], cwd=REPO, env=train_env(),
                             capture_output=True, text=True, timeout=120)
    assert trainer.returncode == 0, trainer.stderr
    ours = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert ours.exit_code == 0, ours.output
    theirs = _long_flags(trainer.stdout) - {"--help"}
    assert theirs and theirs <= _long_flags(ours.stdout), theirs - _long_flags(ours.stdout)
    assert {"--num-gpus", "--master-port"} <= _long_flags(ours.stdout)


def test_trainer_argv_parses_to_the_same_options():
    kw = dict(config="tiny", overrides=["model.n_layers=3", "train.seed=2"], ds="ds_configs/zero1.json",
              ds_overrides=["bf16.enabled=false"], run_dir="runs/x", train_shards="a/{0..3}.tar", val_shards=None,
              max_steps=7, eval_every=None, save_every=5, resume="none", stop_after=3)
    args = parse_args(trainer_argv(**kw))
    assert (args.config, args.overrides, args.ds, args.ds_overrides, args.run_dir, args.train_shards,
            args.val_shards, args.max_steps, args.eval_every, args.save_every, args.resume, args.stop_after) == (
        "tiny", kw["overrides"], "ds_configs/zero1.json", ["bf16.enabled=false"], "runs/x", "a/{0..3}.tar",
        None, 7, None, 5, "none", 3)


def test_train_refuses_a_bad_config_with_exit_2():
    r = CliRunner().invoke(app, ["train", "--config", "tiny", "--set", "model.n_heads=3", "--train-shards", "x"])
    assert r.exit_code == 2 and "d_model=32 is not divisible by n_heads=3" in r.stderr, (r.output, r.exception)


@pytest.mark.slow
def test_train_one_rank_in_process(tmp_path):
    shards = make_demo_shards(tmp_path / "data", n_train=16, n_val=0, shard_size=8)
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vlm_dist.cli", "train", "--config", "tiny", "--train-shards",
                        str(shards / "train"), "--run-dir", str(run_dir), "--max-steps", "2", "--ds-set",
                        "train_micro_batch_size_per_gpu=4", "--ds-set", "bf16.enabled=false"],
                       cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "world size 1 on cpu" in r.stdout + r.stderr
    assert sorted(losses(run_dir)) == [1, 2] and (run_dir / "checkpoints" / "step2").is_dir()
