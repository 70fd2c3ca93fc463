"""Resume checks and the elastic plan, as pure functions of the recorded and current run shapes."""

from __future__ import annotations

import pytest

from vlm_dist.config import load_config
from vlm_dist.data.manifest import Shard
from vlm_dist.train.checkpoint import CheckpointError
from vlm_dist.train.resume import check, plan_elastic, run_shape

SHARDS = [Shard("/data/a/train-00000.tar", 40), Shard("/data/a/train-00001.tar", 24)]


def shape(world=2, micro=4, accum=1, workers=1, overrides=(), shards=SHARDS, stage=2):
    cfg = load_config("tiny", [f"data.num_workers={workers}", *overrides])
    return run_shape(cfg, micro, accum, world, shards, stage), cfg.model_dump(mode="json")


def test_same_shape_resumes_and_lists_harmless_changes():
    saved, saved_cfg = shape()
    now, cfg = shape(overrides=["train.eval_every=7", "log.log_every=3", "model.compile=true"])
    elastic, notes = check(saved, now, saved_cfg, cfg, batch_in_epoch=4, elastic=False)
    assert elastic is None
    assert notes == ["changed since the checkpoint (harmless): log.log_every: 1 -> 3",
                     "changed since the checkpoint (harmless): model.compile: False -> True",
                     "changed since the checkpoint (harmless): train.eval_every: 5 -> 7"]


def test_moving_the_shards_is_not_a_change():
    saved, cfg = shape()
    now, _ = shape(shards=[Shard("/elsewhere/train-00000.tar", 40), Shard("/elsewhere/train-00001.tar", 24)])
    assert check(saved, now, cfg, cfg, 4, False) == (None, [])


@pytest.mark.parametrize("kwargs,field", [
    ({"overrides": ["train.seed=1"]}, "seed: checkpoint 0, this run 1"),
    ({"overrides": ["data.max_text_len=20"]}, "data.max_text_len: checkpoint 24, this run 20"),
    ({"overrides": ["model.n_layers=3"]}, "model.n_layers: checkpoint 2, this run 3"),
    ({"shards": SHARDS[:1]}, "shards.count: checkpoint 2, this run 1"),
    ({"micro": 2}, "micro_batch: checkpoint 4, this run 2"),
    ({"stage": 3}, "zero_stage: checkpoint 2, this run 3"),
])
def test_shape_changes_that_break_exactness_are_refused(kwargs, field):
    saved, cfg = shape()
    now, _ = shape(**kwargs)
    with pytest.raises(CheckpointError, match="another shape") as err:
        check(saved, now, cfg, cfg, 4, elastic=True)
    assert field in str(err.value) and "--resume none" in str(err.value)


def test_world_change_needs_elastic():
    saved, cfg = shape(world=2)
    now, _ = shape(world=1)
    with pytest.raises(CheckpointError, match=r"world_size 2 -> 1.*Pass --elastic"):
        check(saved, now, cfg, cfg, 4, elastic=False)
    plan, _ = check(saved, now, cfg, cfg, 4, elastic=True)
    assert (plan.streams_per_rank, plan.accumulation, plan.batch_in_epoch) == (2, 2, 8)


def test_elastic_plans_keep_streams_and_global_batch():
    # 4 ranks x 2 workers x accumulation 2 -> 8 streams, 8 micro-batches a step: each step takes one batch of
    # every stream, however the streams are split into ranks
    saved, _ = shape(world=4, workers=2, accum=2)
    assert plan_elastic(saved, shape(world=2)[0], 6) == plan_elastic(saved, shape(world=2, workers=7)[0], 6)
    p = plan_elastic(saved, shape(world=2)[0], 6)  # 3 batches of each stream consumed
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (4, 4, 12)
    p = plan_elastic(saved, shape(world=1)[0], 6)
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (8, 8, 24)
    p = plan_elastic(saved, shape(world=8)[0], 6)
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (1, 1, 3)
    with pytest.raises(CheckpointError, match=r"8 data streams and 8 micro-batches .* World sizes that can: \[1, 2, 4, 8\]"):
        plan_elastic(saved, shape(world=3)[0], 6)
    with pytest.raises(CheckpointError, match="not at a multiple of its 2 streams"):
        plan_elastic(saved, shape(world=2)[0], 5)
    with pytest.raises(CheckpointError, match="needs a ZeRO checkpoint"):
        plan_elastic(shape(world=4, workers=2, accum=2, stage=0)[0], shape(world=2)[0], 6)


def test_elastic_refuses_a_world_that_groups_the_batches_into_other_steps():
    """4 ranks x 2 workers x accumulation 1: a step takes stream 0 of every rank, then stream 1. On 2 ranks (4
    streams, accumulation 2) a step would take streams 0 and 1 of half the ranks: every sample once per epoch
    still, but other samples in each step, so the run would not continue exactly (refused). 2 ranks x 1 worker
    x accumulation 1 regroup exactly on 1 rank (2 streams, accumulation 2): each step takes both streams."""
    from vlm_dist.train.resume import same_steps, step_groups

    assert step_groups(4, 2, 1, 2) == [frozenset({(0, 0), (2, 0), (4, 0), (6, 0)}), frozenset({(1, 0), (3, 0), (5, 0), (7, 0)})]
    assert step_groups(2, 4, 2, 2) == [frozenset({(0, 0), (1, 0), (4, 0), (5, 0)}), frozenset({(2, 0), (3, 0), (6, 0), (7, 0)})]
    assert not same_steps(4, 2, 1, 2) and not same_steps(2, 2, 1, 1) and same_steps(2, 1, 1, 1)
    saved, _ = shape(world=4, workers=2)
    with pytest.raises(CheckpointError, match=r"other samples than the uninterrupted run's .* World sizes that can: \[4\]"):
        plan_elastic(saved, shape(world=2)[0], 6)
    p = plan_elastic(shape(world=2)[0], shape(world=1)[0], 4)
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (2, 2, 8)


def test_deepspeed_settings_precision_is_refused_optimizer_changes_are_listed():
    """The precision is part of the shape (the optimizer states exist in one precision; bf16.enabled="auto" can
    change it on other hardware); optimizer, scheduler and clipping changes are allowed and listed; a new length
    (max_steps, epochs) says that it re-plans the learning-rate schedule. A checkpoint that recorded none of
    these (made before they were) is not compared on them."""
    ds = {"bf16": {"enabled": False}, "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.1}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}, "gradient_clipping": 1.0}
    cfg = load_config("tiny", ["data.num_workers=1"])
    saved = run_shape(cfg, 4, 1, 2, SHARDS, 2, ds)
    bf16 = run_shape(cfg, 4, 1, 2, SHARDS, 2, {**ds, "bf16": {"enabled": True}})
    conf = cfg.model_dump(mode="json")
    with pytest.raises(CheckpointError, match=r"trained in fp32 and this run would train in bf16.*--ds-set bf16.enabled=false"):
        check(saved, bf16, conf, conf, 4, elastic=False)
    changed = run_shape(cfg, 4, 1, 2, SHARDS, 2, {**ds, "optimizer": {"type": "AdamW", "params": {"lr": 0.5, "weight_decay": 0.1}},
                                                "gradient_clipping": 0.0})
    longer = load_config("tiny", ["data.num_workers=1", "train.max_steps=40"]).model_dump(mode="json")
    elastic, notes = check(saved, changed, conf, longer, 4, elastic=False)
    assert elastic is None and notes == [
        "changed since the checkpoint (the learning-rate schedule is re-planned over the new length from this step): "
        f"train.max_steps: {conf['train']['max_steps']!r} -> 40",
        "changed since the checkpoint (the optimizer goes on with the new value from this step): gradient_clipping: 1.0 -> 0.0",
        "changed since the checkpoint (the optimizer goes on with the new value from this step): optimizer.params.lr: 0.001 -> 0.5"]
    old = run_shape(cfg, 4, 1, 2, SHARDS, 2)  # recorded before precision and optimizer settings were
    assert check(old, bf16, conf, conf, 4, elastic=False) == (None, [])
