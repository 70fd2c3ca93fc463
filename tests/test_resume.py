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
    # 4 ranks x 2 workers x accumulation 1 -> 8 streams, 4 micro-batches a step
    saved, _ = shape(world=4, workers=2)
    assert plan_elastic(saved, shape(world=2)[0], 6) == plan_elastic(saved, shape(world=2, workers=7)[0], 6)
    p = plan_elastic(saved, shape(world=2)[0], 6)  # 3 batches of each stream consumed
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (4, 2, 12)
    p = plan_elastic(saved, shape(world=1)[0], 6)
    assert (p.streams_per_rank, p.accumulation, p.batch_in_epoch) == (8, 4, 24)
    with pytest.raises(CheckpointError, match=r"8 data streams and 4 micro-batches .* World sizes that can: \[1, 2, 4\]"):
        plan_elastic(saved, shape(world=8)[0], 6)
    with pytest.raises(CheckpointError, match="not at a multiple of its 2 streams"):
        plan_elastic(saved, shape(world=2)[0], 5)
    with pytest.raises(CheckpointError, match="needs a ZeRO checkpoint"):
        plan_elastic(shape(world=4, workers=2, stage=0)[0], shape(world=2)[0], 6)
