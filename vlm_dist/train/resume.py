"""What a checkpoint must agree on with the run that resumes it, and the elastic path when it doesn't.

Every checkpoint records the run's *shape* (`run_shape`): world size, micro-batch, accumulation, data
streams per rank, seed, the training shards (names and sample counts), the data and model sections.
The loader's sample order is a pure function of those (vlm_dist/data/loader.py), so resuming with the
same shape continues exactly. `check` compares a checkpoint's shape with this run's:
- same shape: resume; other config changes (eval interval, logging, ...) are listed as notes;
- the data, model, seed or shards differ: refused, naming both values (start a new --run-dir, or
  --resume none);
- only the world size / accumulation / streams differ: refused unless `--elastic`, which continues on
  the new world *exactly*: the loader plans S = world x streams streams ("slots") whose order does not
  depend on how they are split into ranks and workers, so the new world keeps S (streams per rank =
  S / new world) and the global batch (accumulation = old accumulation x old world / new world), and
  the position, counted in batches per slot, carries over. The engine state goes through DeepSpeed's
  Universal Checkpoint (train/engine.py `to_universal`), which loads on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from vlm_dist.config import RunConfig
from vlm_dist.data.manifest import Shard
from vlm_dist.train.checkpoint import CheckpointError
from vlm_dist.train.dsconfig import precision

# Shape keys that the elastic path may change (together, under its rules); any other difference refuses.
ELASTIC_KEYS = ("world_size", "accumulation", "streams_per_rank")
OPTIMIZER_KEY = "optimization"  # DeepSpeed's optimizer, scheduler and clipping: may change, each change listed
# run config fields whose change alters the rest of the run's training, though the checkpoint continues
REPLANS = {"train.max_steps": "the learning-rate schedule is re-planned over the new length from this step",
           "train.epochs": "the learning-rate schedule is re-planned over the new length from this step"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_shape(cfg: RunConfig, micro: int, accum: int, world: int, shards: list[Shard], zero_stage: int,
              ds: dict | None = None) -> dict:
    """The run's shape; with `ds` (the resolved DeepSpeed config) also its precision (part of the shape: a
    checkpoint's optimizer states exist in one precision) and its optimizer, scheduler and clipping
    (`OPTIMIZER_KEY`: a change is allowed and listed). Checkpoints from before these were recorded lack them."""
    data = cfg.data.model_dump(mode="json", exclude={"train_shards", "val_shards", "num_workers"})
    shape = {
        "world_size": world, "micro_batch": micro, "accumulation": accum,
        "streams_per_rank": max(1, cfg.data.num_workers), "seed": cfg.train.seed, "zero_stage": zero_stage,
        "shards": {"count": len(shards), "samples": sum(s.samples for s in shards),
                   "digest": _digest([[s.url.rsplit("/", 1)[-1], s.samples] for s in shards])},
        "data": data, "model": cfg.model.model_dump(mode="json", exclude={"compile"}),  # compile: how, not what
    }
    if ds is not None:
        shape["precision"] = precision(ds)
        # a copy: the trainer fills the scheduler's "auto" lengths in `ds` later
        shape[OPTIMIZER_KEY] = json.loads(json.dumps({k: ds.get(k) for k in ("optimizer", "scheduler", "gradient_clipping")}))
    return shape


@dataclass(frozen=True)
class Elastic:
    """How this run continues a checkpoint made on another world size."""
    streams_per_rank: int
    accumulation: int
    batch_in_epoch: int  # this rank's micro-batches already consumed in the epoch, in the new world

    def describe(self, saved: dict) -> str:
        return (f"elastic resume: {saved['world_size']} -> world size now; data streams per rank "
                f"{saved['streams_per_rank']} -> {self.streams_per_rank} (same {saved['world_size'] * saved['streams_per_rank']} "
                f"streams in all), accumulation {saved['accumulation']} -> {self.accumulation} (same global batch)")


def _diff(saved, now, prefix=""):
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            yield from _diff(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
    elif saved != now:
        yield prefix, saved, now


def check(saved: dict, now: dict, saved_config: dict, config: dict, batch_in_epoch: int,
          elastic: bool) -> tuple[Elastic | None, list[str]]:
    """Refuse a resume that would not continue exactly; returns (elastic plan or None, notes to log)."""
    # keys a checkpoint from before they were recorded lacks are not compared
    diffs = [d for d in _diff(saved, {k: v for k, v in now.items() if k in saved}) if not d[0].startswith(OPTIMIZER_KEY)]
    if any(k == "precision" for k, _, _ in diffs):
        raise CheckpointError(
            f"the checkpoint trained in {saved['precision']} and this run would train in {now['precision']}: its "
            f"optimizer states exist in {saved['precision']} only. Continue it with --ds-set "
            f"bf16.enabled={'true' if saved['precision'] == 'bf16' else 'false'}"
            + (" --ds-set fp16.enabled=true" if saved["precision"] == "fp16" else "")
            + " (bf16.enabled=\"auto\" picks from the hardware, so a move to other hardware can change it), or "
            "start afresh with --resume none or a new --run-dir")
    hard = [d for d in diffs if d[0] not in ELASTIC_KEYS]
    if hard:
        lines = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in hard[:6])
        raise CheckpointError(
            f"the checkpoint was made by a run of another shape ({lines}): resuming would not continue the same "
            f"training. Restore those settings, or start afresh with --resume none or a new --run-dir")
    notes = [f"changed since the checkpoint ({REPLANS.get(k, 'harmless')}): {k}: {a!r} -> {b!r}"
             for k, a, b in _diff(_soft(saved_config), _soft(config))]
    if OPTIMIZER_KEY in saved:
        notes += [f"changed since the checkpoint (the optimizer goes on with the new value from this step): "
                  f"{k.removeprefix(OPTIMIZER_KEY + '.')}: {a!r} -> {b!r}"
                  for k, a, b in _diff(saved[OPTIMIZER_KEY], now.get(OPTIMIZER_KEY), OPTIMIZER_KEY)]
    if not diffs:
        return None, notes
    if not elastic:
        lines = ", ".join(f"{k} {a} -> {b}" for k, a, b in diffs)
        raise CheckpointError(
            f"the checkpoint was made with another world/batch split ({lines}): the data position would replay "
            f"the wrong samples. Pass --elastic to continue exactly on {now['world_size']} rank(s) (DeepSpeed "
            f"Universal Checkpoint + the same data streams), or restore the saved world size and DeepSpeed batch fields")
    return plan_elastic(saved, now, batch_in_epoch), notes


def _soft(config: dict) -> dict:
    """The config fields that may change between sessions without breaking exactness (model.compile:
    the same computation to float reassociation; a config saved before it existed ran eager)."""
    soft = {k: v for k, v in config.items() if k in ("train", "log")}
    return {**soft, "model": {"compile": config.get("model", {}).get("compile", False)}}


def plan_elastic(saved: dict, now: dict, batch_in_epoch: int) -> Elastic:
    old_world, new_world = saved["world_size"], now["world_size"]
    slots = old_world * saved["streams_per_rank"]
    global_micro = old_world * saved["accumulation"]  # micro-batches per optimizer step, over all ranks
    if saved["zero_stage"] < 1:
        raise CheckpointError("--elastic needs a ZeRO checkpoint (stage >= 1; DeepSpeed's universal format)")
    if slots % new_world or global_micro % new_world:
        ok = sorted(w for w in range(1, slots + 1) if slots % w == 0 and global_micro % w == 0)
        raise CheckpointError(
            f"--elastic: the run has {slots} data streams and {global_micro} micro-batches per step over all ranks; "
            f"{new_world} rank(s) cannot split both evenly. World sizes that can: {ok}")
    if batch_in_epoch % saved["streams_per_rank"]:
        raise CheckpointError(f"--elastic: the checkpoint stopped at micro-batch {batch_in_epoch}, not at a multiple "
                              f"of its {saved['streams_per_rank']} streams per rank; resume it on its own world first")
    if not same_steps(old_world, saved["streams_per_rank"], saved["accumulation"], new_world):
        ok = [w for w in range(1, slots + 1) if slots % w == 0 and global_micro % w == 0
              and same_steps(old_world, saved["streams_per_rank"], saved["accumulation"], w)]
        raise CheckpointError(
            f"--elastic: on {new_world} rank(s) each optimizer step would take other samples than the uninterrupted "
            f"run's (its {old_world} rank(s) x {saved['streams_per_rank']} streams x accumulation "
            f"{saved['accumulation']} group the streams' batches into steps differently): it would not continue exactly. "
            f"World sizes that can: {ok}")
    streams = slots // new_world
    per_slot = batch_in_epoch // saved["streams_per_rank"]
    return Elastic(streams_per_rank=streams, accumulation=global_micro // new_world, batch_in_epoch=per_slot * streams)


def step_groups(world: int, streams: int, accum: int, steps: int) -> list[frozenset]:
    """Which (slot, batch of that slot) each of the first `steps` optimizer steps of an epoch trains on, over
    all ranks: rank r's micro-batch b comes from its stream b % streams (slot r x streams + b % streams), the
    (b // streams)-th batch of that stream, and a step takes `accum` micro-batches of every rank."""
    return [frozenset((r * streams + b % streams, b // streams) for r in range(world)
                      for b in range(k * accum, (k + 1) * accum)) for k in range(steps)]


def same_steps(old_world: int, streams: int, accum: int, new_world: int) -> bool:
    """Whether `new_world` ranks (the same slots and global batch, split evenly) group the slots' batches into
    the same optimizer steps as the old layout. Both patterns repeat, so one common period decides; a resume
    starts at a whole round of each rank's streams, where both patterns start a period."""
    slots, global_micro = old_world * streams, old_world * accum
    n_streams, n_accum = slots // new_world, global_micro // new_world
    steps = math.lcm(math.lcm(streams, accum) // accum, math.lcm(n_streams, n_accum) // n_accum)
    return step_groups(old_world, streams, accum, steps) == step_groups(new_world, n_streams, n_accum, steps)
