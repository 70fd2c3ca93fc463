"""The DeepSpeed JSON vs the run: agreement checks and "auto" values (fast, no processes)."""

import json

import pytest

from vlm_dist.config import ConfigError
from vlm_dist.train.dsconfig import (batch_geometry, cpu_flags, hardware_precision, load_ds_config, precision,
                                     resolve_precision, resolve_schedule)

# (cuda, cuda supports bf16, CPU flags): machines the precision choice is tested on.
H100 = (True, True, {"avx2", "avx512f"})
V100 = (True, False, {"avx2"})
EPYC_AVX2 = (False, False, {"sse4_2", "avx", "avx2", "fma"})  # e.g. Zen 2/3: bf16 only emulated
ZEN5 = (False, False, {"avx2", "avx512f", "avx512bw", "avx512_bf16"})
SAPPHIRE_RAPIDS = (False, False, {"avx2", "avx512f", "amx_tile", "amx_bf16"})
NO_CPUINFO = (False, False, None)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "zero2_fp16", "demo_zero2"])
@pytest.mark.parametrize("machine, expected", [(H100, "bf16"), (EPYC_AVX2, "fp32"), (ZEN5, "bf16")])
def test_shipped_configs_load_and_agree_with_any_world_size(name, machine, expected):
    ds = load_ds_config(f"ds_configs/{name}.json", hardware=machine)
    micro, accum, glob = batch_geometry(ds, world_size=4)
    assert glob == micro * accum * 4
    assert resolve_schedule(ds, 1000, "test") is None and ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert precision(ds) == ("fp16" if "fp16" in name else expected)


@pytest.mark.parametrize("machine, expected, why", [
    (H100, "bf16", "GPU supports bf16"), (V100, "fp32", "GPU has no bf16"),
    (EPYC_AVX2, "fp32", "no native bf16"), (ZEN5, "bf16", "avx512_bf16"), (SAPPHIRE_RAPIDS, "bf16", "amx_bf16"),
    (NO_CPUINFO, "fp32", "unreadable")])
def test_auto_precision_follows_the_hardware_and_says_why(machine, expected, why):
    assert hardware_precision(*machine)[0] == expected
    ds = load_ds_config("ds_configs/zero2.json", hardware=machine)
    assert ds["bf16"]["enabled"] is (expected == "bf16") and precision(ds) == expected
    assert f"precision {expected}: bf16.enabled=auto" in ds["_precision"] and why in ds["_precision"]
    assert "--ds-set bf16.enabled" in ds["_precision"]  # says how to override


def test_explicit_precision_overrides_auto():
    forced = load_ds_config("ds_configs/zero2.json", ["bf16.enabled=true"], hardware=EPYC_AVX2)
    assert precision(forced) == "bf16" and "emulated" in forced["_precision"]  # kept, with a warning
    off = load_ds_config("ds_configs/zero2.json", ["bf16.enabled=false"], hardware=H100)
    assert precision(off) == "fp32" and "set in the DeepSpeed config" in off["_precision"]
    with pytest.raises(ConfigError, match="true, false or"):
        load_ds_config("ds_configs/zero2.json", ["bf16.enabled=maybe"], hardware=H100)
    both = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": True}}
    resolve_precision(both, H100)
    assert precision(both) == "fp16"  # DeepSpeed refuses bf16 and fp16 together
    with pytest.raises(ConfigError, match="resolve_precision"):
        precision({"bf16": {"enabled": "auto"}})


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    assert cpu_flags(tmp_path / "x86") == {"fpu", "avx2", "avx512_bf16"}
    assert hardware_precision(False, False, cpu_flags(tmp_path / "arm"))[0] == "bf16"
    assert cpu_flags(tmp_path / "missing") is None


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
