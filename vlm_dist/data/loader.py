"""The streaming loader: webdataset shards -> fixed-shape batches, equal and resumable across ranks.

    loader = build_loader(cfg, "data/demo/shards/train", rank=r, world_size=w, micro_batch=8, train=True)
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch, skip_batches=k if epoch == resume_epoch else 0)
        for batch in loader:     # exactly loader.batches_per_epoch - k batches, on every rank
            ...

A batch is a dict: images uint8 (B, 3, H, W), the tower's crop (samples.normalize_images makes them
its float input; the trainer does it on the device), or from feature shards (data/features.py) the frozen
tower's tokens (B, P, W) in their stored dtype; input_ids long (B, T) with T = max_text_len - 1;
targets long (B, n_future, T); keys, image_ids, kinds ("caption" | "qa"), questions (str | None),
references (all captions of the image, or [answer]) as lists; is_pad bool (B,) marks padding repeats
(exclude them from evaluation); truncated bool (B,) marks cut targets.

Equal, known, resumable epochs. Each rank runs W = max(1, data.num_workers) streams ("slots"; slot
= rank * W + worker, S = world_size * W in all). epochs.EpochPlan cuts epoch e's shard-shuffled
concatenation of all N samples into S contiguous ranges and pads each to the same multiple L of the
micro-batch, so every slot yields L/m batches and a rank yields W*L/m, computed from manifest counts
alone (`batches_per_epoch`). Per slot, a webdataset pipeline runs:
    segments -> range_samples (tarfile_samples on each segment's shard, only jpg/json/txt members,
    islice to the segment) -> shuffle (buffer seeded by (seed, epoch, rank, worker)) -> skip ->
    map(decode + caption/Q&A choice + tokenize) -> batched(m)
Batching happens in the worker and the DataLoader (batch_size=None) takes its j-th batch from
worker j % W, so batch b of an epoch comes from stream b % W. Resuming at batch k: stream w drops
its first ceil((k-w)/W) batches' worth of raw samples (after the shuffle buffer, before any image
decoding), and DataLoader worker i plays stream (i + k) % W so that the first batch out is batch k. Everything that decides a batch is a
pure function of (seed, epoch, rank, world_size, W, micro_batch, manifest): the order of samples does
not depend on timing and per-sample choices are seeded by (seed, epoch, key).
"""

from __future__ import annotations

import copy
import signal
import sys
import tarfile
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_dist.config import RunConfig
from vlm_dist.data.epochs import EpochPlan, Segment, batches_consumed, rng_for
from vlm_dist.data.features import features_record
from vlm_dist.data.index import sample_problem
from vlm_dist.data.manifest import Shard, resolve_shards
from vlm_dist.data.samples import SamplePreparer, collate, wanted_member
from vlm_dist.text import get_tokenizer


class ShardMismatchError(RuntimeError):
    """A tar holds fewer samples than its manifest says (changed or damaged since it was written)."""


def _range_samples(segments, select_files=wanted_member):
    """webdataset stage: for each Segment, the raw samples [start, start+count) of its tar.

    Reading uses webdataset's own tar iteration; samples before `start` are read but never decoded.
    """
    for seg in segments:
        src = wds.tarfile_samples([{"url": seg.url}], select_files=select_files)
        # Indices count usable samples only (image + caption), as the manifest / scan counted them.
        src = (raw for raw in src if sample_problem(raw) is None)
        got = 0
        try:
            for sample in islice(src, seg.start, seg.start + seg.count):
                sample["__pad__"] = seg.pad
                got += 1
                yield sample
        except (tarfile.TarError, OSError) as err:  # truncated or overwritten: tarfile's message names no fix
            raise ShardMismatchError(
                f"{seg.url} is damaged after {seg.start + got} usable samples ({type(err).__name__}: {err}): write it "
                f"again (rerun shard-coco on its directory) or remove it and rerun `vlm-dist index-shards`") from err
        if got != seg.count:
            raise ShardMismatchError(
                f"{seg.url} ended after {seg.start + got} samples but its manifest promises at least "
                f"{seg.start + seg.count}; the shard changed or is damaged: rerun shard-coco on its directory")


range_samples = wds.pipelinefilter(_range_samples)


class ShardStream(IterableDataset):
    """The per-rank IterableDataset; in each DataLoader worker it streams that worker's slot."""

    def __init__(self, cfg: RunConfig, plan: EpochPlan, *, rank: int, n_workers: int, micro_batch: int,
                 train: bool, seed: int):
        self.cfg, self.plan, self.rank, self.n_workers = cfg, plan, rank, n_workers
        self.micro_batch, self.train, self.seed = micro_batch, train, seed
        self.resampled = train and cfg.data.resampled
        self.features = features_record(plan.shards) is not None  # the manifests say: tower tokens, not JPEGs
        self.epoch, self.skip_batches = 0, 0

    def _slot_batches(self, epoch: int, worker: int, skip_samples: int, prep: SamplePreparer):
        slot = self.rank * self.n_workers + worker
        segments: list[Segment] = (self.plan.resampled_segments(epoch, slot) if self.resampled
                                   else self.plan.segments(epoch, slot, shuffle=self.train))
        bufsize = self.cfg.data.shuffle_buffer if self.train else 0
        pipeline = wds.DataPipeline(
            lambda: iter(segments),  # (a list would be taken as a list of stages)
            range_samples(),
            # Seeded per slot, not per (rank, worker): 1 rank x 2 workers streams exactly like 2 ranks x 1.
            wds.shuffle(bufsize, initial=bufsize, rng=rng_for("buffer", self.seed, epoch, slot))
            if bufsize > 1 else None,
            lambda src: islice(src, skip_samples, None),  # resume: drop raw samples, before decoding
            wds.map(lambda raw: prep(raw, epoch)),
            wds.batched(self.micro_batch, collation_fn=lambda s: collate(s, prep), partial=False),
        )
        yield from pipeline

    def __iter__(self):
        info = get_worker_info()
        if (info.num_workers if info is not None else 1) != self.n_workers:
            raise RuntimeError(f"ShardStream planned for {self.n_workers} worker(s) but runs in "
                               f"{info.num_workers if info else 1}; iterate it through StreamingLoader")
        epoch, skip = self.epoch, self.skip_batches
        # The DataLoader asks worker 0 first, but the first batch due is batch `skip`, which belongs to
        # stream skip % W: DataLoader worker i therefore plays stream (i + skip) % W. Its j-th batch is
        # then the rank's batch skip + j, also across resampled virtual epochs (W divides their length).
        worker = ((info.id if info is not None else 0) + skip) % self.n_workers
        prep = SamplePreparer(self.cfg, self.seed, features=self.features)
        while True:
            consumed = batches_consumed(skip, worker, self.n_workers)
            yield from self._slot_batches(epoch, worker, consumed * self.micro_batch, prep)
            if not self.resampled:
                return
            epoch, skip = epoch + 1, 0  # resampled: chain virtual epochs forever


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # W workers x all cores each would oversubscribe the CPU
    # A stop signal sent to the job's process group (Ctrl-C, `kill -TERM -- -PGID`, SLURM) reaches the
    # workers too: they leave stopping to their rank, which saves a checkpoint and then shuts them down.
    # (A worker whose rank dies exits by itself: DataLoader workers watch their parent.)
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class StreamingLoader:
    """Iterable over one rank's batches of the current epoch (resampled: forever, epoch after epoch)."""

    def __init__(self, dataset: ShardStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        plan = dataset.plan
        self.batches_per_epoch = dataset.n_workers * plan.batches_per_slot  # per rank, same on every rank
        self.samples_per_epoch = self.batches_per_epoch * dataset.micro_batch  # per rank, padding included
        slots = range(dataset.rank * dataset.n_workers, (dataset.rank + 1) * dataset.n_workers)
        pad = 0 if dataset.resampled else sum(plan.pad_count(s) for s in slots)
        self.stats = {"n_samples": plan.n_samples, "shards": len(plan.shards), "slots": plan.n_slots,
                      "per_slot": plan.per_slot, "planned_pad_rank": pad,
                      "planned_pad_all_ranks": 0 if dataset.resampled else plan.total_pad,
                      "epoch": 0, "batches": 0, "samples": 0, "pad_samples": 0, "truncated": 0, "qa": 0}

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def resampled(self) -> bool:
        return self.dataset.resampled

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iteration yields batches skip_batches, skip_batches+1, ... of this rank's epoch
        `epoch` (resampled mode: of the endless stream that starts at virtual epoch `epoch`)."""
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"epoch and skip_batches must be >= 0, got {epoch}, {skip_batches}")
        if self.resampled:
            epoch, skip_batches = epoch + skip_batches // self.batches_per_epoch, skip_batches % self.batches_per_epoch
        elif skip_batches > self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} > batches_per_epoch={self.batches_per_epoch}")
        self.dataset.epoch, self.dataset.skip_batches = epoch, skip_batches

    def describe(self) -> str:
        s = self.stats
        text = (f"{s['n_samples']} samples in {s['shards']} shard(s) over {s['slots']} stream(s): "
                f"{self.batches_per_epoch} batches/epoch/rank, padding {s['planned_pad_rank']} repeat(s) on this "
                f"rank, {s['planned_pad_all_ranks']} on all ranks" + (" (resampled)" if self.resampled else ""))
        if s.get("skipped"):
            text += f"; {s['skipped']} sample(s) without an image or a caption skipped"
        if s.get("scanned"):
            text += (f"; {s['scanned']} shard(s) had no manifest.json and were scanned at start-up "
                     f"(`vlm-dist index-shards DIR` writes one)")
        return text

    def __iter__(self):
        ds = copy.copy(self.dataset)  # this iteration's (epoch, skip): workers may start after we return
        self.dataset.skip_batches = 0  # the skip applies to one iteration only
        expected = None if self.resampled else self.batches_per_epoch - ds.skip_batches
        if self.num_workers == 0:
            it = iter(ds)
        else:
            # Pinned batches (on a GPU host) let the trainer's non_blocking copies overlap the step. The generator:
            # without one, each new iterator seeds its workers from the global torch RNG, one draw that a resumed
            # run (its RNG restored, then a new iterator) makes once more than the uninterrupted run, shifting
            # every later dropout mask. The workers seed their own RNGs (seed, epoch, slot) anyway.
            base = torch.Generator().manual_seed(int(rng_for("loader", ds.seed, ds.epoch, ds.rank).getrandbits(63)))
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
                                 persistent_workers=False, prefetch_factor=2, pin_memory=torch.cuda.is_available(),
                                 generator=base))
        self.stats.update(epoch=ds.epoch, batches=0, samples=0, pad_samples=0, truncated=0, qa=0, bad_images=0)
        for batch in it:
            st = self.stats
            st["batches"] += 1
            st["samples"] += len(batch["keys"])
            st["pad_samples"] += int(batch["is_pad"].sum())
            st["truncated"] += int(batch["truncated"].sum())
            st["qa"] += batch["kinds"].count("qa")
            for key, url, why in batch["bad"]:
                st["bad_images"] += 1
                print(f"warning: rank {ds.rank}: sample {key!r} in {url}: its image does not decode ({why}); it "
                      f"trains nothing (its targets are masked) and stays in its batch as padding "
                      f"({st['bad_images']} such this epoch on this rank)", file=sys.stderr, flush=True)
            yield batch
        if expected is not None and self.stats["batches"] != expected:
            raise RuntimeError(f"rank {ds.rank} yielded {self.stats['batches']} batches, planned {expected}: "
                               f"ranks would desynchronise; a shard probably changed since its manifest")


def build_loader(cfg: RunConfig, shards: str | list[Shard], *, rank: int, world_size: int, micro_batch: int,
                 train: bool, num_workers: int | None = None, seed: int | None = None) -> StreamingLoader:
    """The trainer's entry point. `shards`: a directory holding manifest.json, or a brace pattern /
    glob of tars in such directories, or what `resolve_shards` made of one. num_workers defaults to
    cfg.data.num_workers, seed to cfg.train.seed."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    workers = cfg.data.num_workers if num_workers is None else num_workers
    streams = max(1, workers)
    seed = cfg.train.seed if seed is None else seed
    found = shards if isinstance(shards, list) else resolve_shards(shards)
    plan = EpochPlan(found, n_slots=world_size * streams, micro_batch=micro_batch, seed=seed)
    ds = ShardStream(cfg, plan, rank=rank, n_workers=streams, micro_batch=micro_batch, train=train, seed=seed)
    get_tokenizer()  # built once here (~0.1 s), so forked DataLoader workers inherit it instead of rebuilding it each epoch
    loader = StreamingLoader(ds, workers)
    loader.stats.update(skipped=sum(s.skipped for s in found), scanned=sum(s.scanned for s in found))
    return loader
