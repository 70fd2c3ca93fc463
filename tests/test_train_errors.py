"""Expected failures of the trainer: one `error:` line from rank 0, exit 2 on every rank, no traceback."""

from __future__ import annotations

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.slow


def errors(tmp_path, *args, **env) -> tuple[list[str], str]:
    out = run_ranks(["--config", "tiny", "--run-dir", str(tmp_path / "run"), *args], 2, expect=2, timeout=300, **env)
    text = "".join(r.stdout for r in out)
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if "error:" in line], text


def test_bad_train_shards(tmp_path):
    lines, _ = errors(tmp_path, "--train-shards", str(tmp_path / "nothing-{000..003}.tar"))
    assert len(lines) == 1 and lines[0].startswith("error: shard pattern") and "matches no files" in lines[0]


def test_bad_config(tmp_path):
    lines, text = errors(tmp_path, "--train-shards", str(tmp_path), "--set", "model.n_heads=3")
    assert lines == ["error: invalid configuration:"] and "not divisible by n_heads=3" in text, text


def test_generation_eval_without_the_eval_extra_fails_before_training(tmp_path):
    """train.generate_every scores captions with pycocoevalcap (the `eval` extra): without it the run stops at
    start-up with the fix named, not with an ImportError at the first generation eval (seen on a GPU machine)."""
    from tests.helpers import make_demo_shards

    shards = make_demo_shards(tmp_path / "data", n_train=16, n_val=8)
    shadow = tmp_path / "shadow" / "pycocoevalcap"  # an installed-looking package that cannot be imported
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named pycocoevalcap (test shadow)')\n")
    lines, _ = errors(tmp_path, "--train-shards", str(shards / "train"), "--val-shards", str(shards / "val"),
                      "--set", "train.generate_every=5", PYTHONPATH=str(tmp_path / "shadow"))
    assert len(lines) == 1 and "train.generate_every=5 scores captions with pycocoevalcap" in lines[0], lines
    assert "pip install -e '.[eval]'" in lines[0] and "train.generate_every=0" in lines[0]
