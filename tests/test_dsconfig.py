"""The DeepSpeed JSON vs the run: agreement checks and "auto" values (fast, no processes)."""

import json

import pytest

from vlm_dist.config import ConfigError
from vlm_dist.train.dsconfig import batch_geometry, load_ds_config, precision, resolve_schedule


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "zero2_fp16", "demo_zero2"])
def test_shipped_configs_load_and_agree_with_any_world_size(name):
    ds = load_ds_config(f"ds_configs/{name}.json")
    micro, accum, glob = batch_geometry(ds, world_size=4)
    assert glob == micro * accum * 4
    assert resolve_schedule(ds, 1000, "test") is None and ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert precision(ds) == ("fp16" if "fp16" in name else "bf16")


def test_global_batch_mismatch_names_both_values():
    ds = load_ds_config("ds_configs/zero2.json", ["train_batch_size=100"])
    with pytest.raises(ConfigError, match=r"train_batch_size=100 but train_micro_batch_size_per_gpu=16 x "
                                          r"gradient_accumulation_steps=1 x world size 2 = 32; set train_batch_size to 32"):
        batch_geometry(ds, world_size=2)


def test_schedule_length_mismatch_names_both_values_and_the_fix():
    ds = load_ds_config("ds_configs/zero2.json", ["scheduler.params.total_num_steps=500"])
    with pytest.raises(ConfigError, match=r"total_num_steps=500 but this run takes 800 optimizer steps "
                                          r"\(train.epochs=8 x 100 steps/epoch\); set total_num_steps to 800"):
        resolve_schedule(ds, 800, "train.epochs=8 x 100 steps/epoch")


def test_short_run_warmup_is_reported_not_silent():
    ds = load_ds_config("ds_configs/zero2.json")
    note = resolve_schedule(ds, 20, "--max-steps 20")
    assert note and "warmup_num_steps=100 > 20" in note and ds["scheduler"]["params"]["warmup_num_steps"] == 20


def test_bad_files_and_values(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
    (tmp_path / "zero.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 0}))
    with pytest.raises(ConfigError, match="positive integer"):
        batch_geometry(load_ds_config(tmp_path / "zero.json"), 1)
