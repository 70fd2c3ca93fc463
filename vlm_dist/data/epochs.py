"""The epoch plan: which samples every (rank, DataLoader worker) slot reads, as pure functions.

    from vlm_dist.data.epochs import EpochPlan
    plan = EpochPlan(shards, n_slots=world_size * workers, micro_batch=8, seed=0)
    plan.segments(epoch=3, slot=rank * workers + worker, shuffle=True)  # [Segment(url, start, count, pad)]

Non-resampled epoch e (N samples in all, S slots, micro-batch m):
  1. shuffle the shard list with Random((seed, e)) (or keep it sorted for eval);
  2. concatenate the shards' samples in that order into global indices 0 .. N-1 (counts from the
     manifest, no tar is opened);
  3. slot s takes the contiguous range [s*N//S, (s+1)*N//S): every sample goes to exactly one slot,
     and a slot opens only the shards that overlap its range (several slots may share one shard, so
     fewer shards than ranks x workers is fine);
  4. every slot is padded to L = ceil(ceil(N/S) / m) * m samples by repeating its own first samples
     (or, if N < S leaves it empty, samples of the global order), flagged pad=True.
So every slot yields L/m batches, known up front: rank batches per epoch = workers * L/m. Padding is
(S*L - N) samples in all, less than S*m, and counted.

Resampled mode: virtual epoch e of slot s draws shards with replacement from Random((seed, e, s)),
each read from a random rotation point, until the slot has exactly L samples; no padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlm_dist.data.manifest import Shard


@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first sample (in the tar's order) to yield
    count: int
    pad: bool = False


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rng_for(*parts) -> random.Random:
    """A Random seeded by a tuple of ints/strings: str seeds hash with SHA-512, so this is the same in
    every process and Python run (unlike hash())."""
    return random.Random("/".join(str(p) for p in parts))


def batches_consumed(skip_batches: int, worker: int, n_workers: int) -> int:
    """Batches of a rank's first `skip_batches` that came from `worker`: DataLoader takes batch b from
    worker b % n_workers, so it is #{b < skip_batches : b % n_workers == worker}."""
    return max(0, ceil_div(skip_batches - worker, n_workers))


class EpochPlan:
    def __init__(self, shards: list[Shard], n_slots: int, micro_batch: int, seed: int):
        if n_slots < 1 or micro_batch < 1:
            raise ValueError(f"need n_slots >= 1 and micro_batch >= 1, got {n_slots}, {micro_batch}")
        self.shards, self.n_slots, self.micro_batch, self.seed = list(shards), n_slots, micro_batch, seed
        self.n_samples = sum(s.samples for s in self.shards)  # N
        if self.n_samples == 0:
            raise ValueError("the shards hold no samples")
        # L: samples every slot yields per epoch, a multiple of the micro-batch.
        self.per_slot = ceil_div(ceil_div(self.n_samples, n_slots), micro_batch) * micro_batch
        self.batches_per_slot = self.per_slot // micro_batch

    def slot_range(self, slot: int) -> tuple[int, int]:
        return slot * self.n_samples // self.n_slots, (slot + 1) * self.n_samples // self.n_slots

    def pad_count(self, slot: int) -> int:
        a, b = self.slot_range(slot)
        return self.per_slot - (b - a)

    @property
    def total_pad(self) -> int:
        return self.n_slots * self.per_slot - self.n_samples

    def shard_order(self, epoch: int, shuffle: bool) -> list[Shard]:
        order = list(self.shards)
        if shuffle:
            rng_for("shards", self.seed, epoch).shuffle(order)
        return order

    @staticmethod
    def _cut(order: list[Shard], a: int, b: int, pad: bool) -> list[Segment]:
        """Segments covering global indices [a, b) of the concatenation of `order`."""
        out, offset = [], 0
        for shard in order:
            lo, hi = max(a, offset), min(b, offset + shard.samples)
            if lo < hi:
                out.append(Segment(shard.url, lo - offset, hi - lo, pad))
            offset += shard.samples
        return out

    def segments(self, epoch: int, slot: int, shuffle: bool) -> list[Segment]:
        """What slot `slot` reads in non-resampled epoch `epoch`, padding last."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} out of range for {self.n_slots} slots")
        order = self.shard_order(epoch, shuffle)
        a, b = self.slot_range(slot)
        segs = self._cut(order, a, b, pad=False)
        need = self.per_slot - (b - a)
        lo, hi = (a, b) if b > a else (0, self.n_samples)  # repeat own samples; an empty slot borrows
        pos = a if b > a else a % self.n_samples
        while need > 0:
            take = min(need, hi - pos)
            segs += self._cut(order, pos, pos + take, pad=True)
            need -= take
            pos = lo if pos + take >= hi else pos + take
        return segs

    def resampled_segments(self, epoch: int, slot: int) -> list[Segment]:
        """Virtual epoch `epoch` of `slot` in resampled mode: exactly per_slot samples."""
        rng = rng_for("resample", self.seed, epoch, slot)
        segs, need = [], self.per_slot
        while need > 0:
            shard = rng.choice(self.shards)
            rot = rng.randrange(shard.samples)
            for start, count in ((rot, shard.samples - rot), (0, rot)):
                take = min(need, count)
                if take > 0:
                    segs.append(Segment(shard.url, start, take))
                    need -= take
        return segs
