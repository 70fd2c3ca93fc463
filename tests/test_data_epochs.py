"""The epoch plan, as pure functions: every sample once, equal minimal-padded slots, determinism.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_data_epochs.py
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from vlm_dist.data.epochs import EpochPlan, batches_consumed
from vlm_dist.data.manifest import Shard


def shards_of(counts: list[int]) -> list[Shard]:
    return [Shard(f"s{i}.tar", n) for i, n in enumerate(counts)]


def expand(segments) -> list[tuple[str, int, bool]]:
    return [(s.url, s.start + j, s.pad) for s in segments for j in range(s.count)]


@pytest.mark.parametrize("counts", [[10], [7, 30, 3, 55], [1, 1, 1], [100, 1], [3]])
@pytest.mark.parametrize("n_slots,micro", [(1, 1), (4, 3), (6, 4), (8, 8), (5, 2)])
def test_every_sample_once_and_equal_minimal_slots(counts, n_slots, micro):
    plan = EpochPlan(shards_of(counts), n_slots, micro, seed=7)
    n = sum(counts)
    all_samples = {(f"s{i}.tar", j) for i, c in enumerate(counts) for j in range(c)}
    for epoch in (0, 1):
        real, pads = Counter(), 0
        for slot in range(n_slots):
            items = expand(plan.segments(epoch, slot, shuffle=True))
            assert len(items) == plan.per_slot  # equal on every slot
            own = {(u, j) for u, j, pad in items if not pad}
            real.update((u, j) for u, j, pad in items if not pad)
            slot_pads = [(u, j) for u, j, pad in items if pad]
            pads += len(slot_pads)
            assert len(slot_pads) == plan.pad_count(slot)
            if own:  # padding repeats the slot's own samples
                assert set(slot_pads) <= own
        assert set(real) == all_samples and set(real.values()) == {1}  # each sample exactly once
        assert pads == plan.total_pad == n_slots * plan.per_slot - n
    # Minimal: L is the smallest multiple of the micro-batch holding the largest slot.
    largest = -(-n // n_slots)
    assert plan.per_slot % micro == 0 and plan.per_slot - micro < largest <= plan.per_slot


def test_shard_order_is_a_seeded_function_of_epoch():
    plan = EpochPlan(shards_of([5] * 12), 3, 2, seed=1)
    orders = [[s.url for s in plan.shard_order(e, shuffle=True)] for e in range(4)]
    assert orders[0] == [s.url for s in EpochPlan(shards_of([5] * 12), 3, 2, seed=1).shard_order(0, True)]
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert orders[0] != [s.url for s in EpochPlan(shards_of([5] * 12), 3, 2, seed=2).shard_order(0, True)]
    assert [s.url for s in plan.shard_order(3, shuffle=False)] == [f"s{i}.tar" for i in range(12)]


def test_batches_consumed_matches_round_robin():
    for workers, skip in itertools.product(range(1, 5), range(0, 13)):
        order = [b % workers for b in range(skip)]  # DataLoader takes batch b from worker b % workers
        assert [batches_consumed(skip, w, workers) for w in range(workers)] == [order.count(w) for w in range(workers)]


def test_resampled_slots_are_exact_and_seeded():
    plan = EpochPlan(shards_of([7, 30, 3]), 4, 4, seed=0)
    a = expand(plan.resampled_segments(2, 1))
    assert len(a) == plan.per_slot and not any(pad for _, _, pad in a)
    assert a == expand(EpochPlan(shards_of([7, 30, 3]), 4, 4, seed=0).resampled_segments(2, 1))
    assert a != expand(plan.resampled_segments(3, 1)) and a != expand(plan.resampled_segments(2, 2))
    assert all(0 <= j < {"s0.tar": 7, "s1.tar": 30, "s2.tar": 3}[u] for u, j, _ in a)
