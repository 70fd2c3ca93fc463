"""Expected failures of the trainer: one `error:` line from rank 0, exit 2 on every rank, no traceback."""

from __future__ import annotations

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.slow


def errors(tmp_path, *args) -> tuple[list[str], str]:
    out = run_ranks(["--config", "tiny", "--run-dir", str(tmp_path / "run"), *args], 2, expect=2, timeout=300)
    text = "".join(r.stdout for r in out)
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if "error:" in line], text


def test_bad_train_shards(tmp_path):
    lines, _ = errors(tmp_path, "--train-shards", str(tmp_path / "nothing-{000..003}.tar"))
    assert len(lines) == 1 and lines[0].startswith("error: shard pattern") and "matches no files" in lines[0]


def test_bad_config(tmp_path):
    lines, text = errors(tmp_path, "--train-shards", str(tmp_path), "--set", "model.n_heads=3")
    assert lines == ["error: invalid configuration:"] and "not divisible by n_heads=3" in text, text
