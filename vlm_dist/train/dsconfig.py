"""The DeepSpeed JSON: loading, dotted overrides, "auto" values, and agreement with the run.

The DeepSpeed config owns batch sizes, optimizer, scheduler, precision and ZeRO stage. The run config
never duplicates those values; this module only fills the ones marked "auto" from the run and refuses
a combination that disagrees, before any training, saying what to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_dist.config import ConfigError, apply_override

# Schedulers whose length DeepSpeed reads from their params, and the key holding it.
_SCHEDULE_LENGTH_KEY = {"WarmupCosineLR": "total_num_steps", "WarmupDecayLR": "total_num_steps", "OneCycle": None}


def load_ds_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found; pick one of ds_configs/*.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    for assignment in overrides:
        apply_override(ds, assignment)
    ds["_source"] = str(path)
    return ds


def batch_geometry(ds: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, global batch), checked against each other."""
    src = ds.get("_source", "the DeepSpeed config")
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"{src}: set train_micro_batch_size_per_gpu to a positive integer (got {micro!r})")
    if not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"{src}: gradient_accumulation_steps must be a positive integer (got {accum!r})")
    glob = micro * accum * world_size
    declared = ds.get("train_batch_size")
    if declared not in (None, "auto") and declared != glob:
        raise ConfigError(
            f"{src}: train_batch_size={declared} but train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {glob}; set train_batch_size to "
            f"{glob}, remove it, or change the micro batch / accumulation so that they multiply to {declared}"
        )
    return micro, accum, glob


def resolve_schedule(ds: dict[str, Any], total_steps: int, how: str) -> str | None:
    """Fill scheduler "auto" lengths with the run's optimizer steps; refuse a declared length that differs.

    `how` explains where total_steps came from (e.g. "train.epochs=8 x 50 steps/epoch"), for the message.
    """
    sched = ds.get("scheduler")
    if not sched:
        return None
    src = ds.get("_source", "the DeepSpeed config")
    params = sched.setdefault("params", {})
    key = _SCHEDULE_LENGTH_KEY.get(sched.get("type"))
    if key is None:
        return None
    declared = params.get(key)
    if declared in (None, "auto"):
        params[key] = total_steps
    elif declared != total_steps:
        raise ConfigError(
            f"{src}: scheduler.params.{key}={declared} but this run takes {total_steps} optimizer steps ({how}); "
            f"set {key} to {total_steps} or \"auto\", or run {declared} steps with --max-steps {declared}"
        )
    warmup = params.get("warmup_num_steps", 0)
    if isinstance(warmup, int) and warmup > params[key]:
        params["warmup_num_steps"] = params[key]
        return f"scheduler warmup_num_steps={warmup} > {params[key]} run steps: warming up over the whole run"
    return None


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def for_deepspeed(ds: dict[str, Any]) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize (without our bookkeeping keys)."""
    return {k: v for k, v in ds.items() if not k.startswith("_")}
