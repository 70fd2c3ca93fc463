"""Building a training run: process group, DeepSpeed config, checkpoint recovery and resume checks,
loaders, model, engine, logger. `setup(cfg, opts)` returns the `Run` that train/loop.py trains.

Order matters: the resume point and its checks come before the loaders and the engine, because an
elastic resume changes the data streams per rank, the accumulation, and how the engine loads.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from vlm_dist.config import ConfigError, RunConfig, save_config
from vlm_dist.data.features import FeatureError, check_features, features_record, tower_fingerprint
from vlm_dist.data.loader import build_loader
from vlm_dist.data.manifest import resolve_shards
from vlm_dist.model import VLM
from vlm_dist.observe.flops import peak_flops
from vlm_dist.observe.gradstats import GradObserver
from vlm_dist.observe.logger import ConsoleLogger, NullLogger, make_logger, truncate_jsonl
from vlm_dist.observe.timing import StepTimer
from vlm_dist.train import checkpoint as ckpt
from vlm_dist.train import resume
from vlm_dist.train.dist import DistInfo, barrier
from vlm_dist.train.dsconfig import batch_geometry, load_ds_config, precision, resolve_schedule
from vlm_dist.train.engine import Engine, init_distributed, to_universal
from vlm_dist.train.preempt import StopRequest
from vlm_dist.train.runlock import hold_run_dir, release
from vlm_dist.train.weights import fetch_once


@dataclass
class RunOptions:
    """What the command line adds to the config: files, paths and the resume policy."""

    ds: str = "ds_configs/zero2.json"
    ds_overrides: list[str] = field(default_factory=list)
    run_dir: str = "runs/default"
    resume: str = "auto"
    elastic: bool = False  # continue a checkpoint made on another number of ranks (train/resume.py)
    stop_after: int | None = None  # end this session after N more steps; the schedule still spans the run


@dataclass
class Run:
    """Everything a training run holds, built once by `setup`."""

    cfg: RunConfig
    opts: RunOptions
    info: DistInfo
    engine: Engine
    train_loader: object
    val_loader: object | None
    accum: int
    steps_per_epoch: int
    total_steps: int
    log: NullLogger
    ckpt_dir: Path
    state: ckpt.TrainState
    shape: dict  # recorded in every checkpoint, checked at resume (train/resume.py)
    stop_at: int
    stop: StopRequest
    timer: StepTimer  # forward / backward / optimizer / observe sections of the current step
    grads: GradObserver  # per-layer gradient statistics and histograms (collectives on every rank)
    peak_flops: float | None  # the device's bf16 peak, for MFU (None on the CPU)
    samples_dir: Path | None = None  # log.sample_keys: RUN/samples/rank{R}.jsonl
    poison: set[int] = field(default_factory=set)  # test hook: steps whose first micro-batch gets NaN images
    lock: IO | None = None  # rank 0: the run folder's lock (train/runlock.py), released when train() ends


def _poisoned_steps(rank: int) -> set[int]:
    """VLM_DIST_INJECT_NAN=STEP[:RANK],... (a fault-injection hook for tests; unset in real runs)."""
    steps = set()
    for item in filter(None, os.environ.get("VLM_DIST_INJECT_NAN", "").split(",")):
        step, _, who = item.partition(":")
        if who == "" or int(who) == rank:
            steps.add(int(step))
    return steps


def _resume_point(opts: RunOptions, ckpt_dir: Path, info: DistInfo, log: NullLogger) -> ckpt.ResumePoint | None:
    if info.is_main:  # also for --resume none: an interrupted save's leftovers go aside with the rest below
        for note in ckpt.recover(ckpt_dir):
            log.info(f"checkpoints: {note}")
    barrier()  # every rank reads the folder as rank 0 left it
    where = ckpt.resolve_resume(opts.resume, ckpt_dir)
    if where is not None:
        for skipped in where.skipped:
            log.info(f"checkpoints: skipped {skipped}")
    if opts.resume != "auto" and info.is_main:  # a fresh start or a rollback: later tags are another trajectory
        moved = ckpt.set_aside(ckpt_dir, where.meta["state"]["step"] if where is not None else -1)
        if moved:
            log.info(f"checkpoints: moved {', '.join(moved)} (later than this run's start) to "
                     f"{ckpt_dir}/superseded-*/")
    barrier()
    return where


def _check_resume(where: ckpt.ResumePoint, shape: dict, cfg: RunConfig, opts: RunOptions,
                  log: NullLogger) -> resume.Elastic | None:
    """Refuse a checkpoint this run cannot continue exactly; log harmless changes; plan an elastic resume."""
    saved_config = json.loads((where.ckpt_dir / where.tag / ckpt.RUN_CONFIG_FILE).read_text())
    elastic, notes = resume.check(where.meta["shape"], shape, saved_config, cfg.model_dump(mode="json"),
                                  where.meta["state"]["batch_in_epoch"], opts.elastic)
    for note in notes:
        log.info(note)
    if elastic is not None:
        log.info(elastic.describe(where.meta["shape"]))
    return elastic


def _universal_copy(where: ckpt.ResumePoint, info: DistInfo) -> str:
    """Rank 0 converts the tag to DeepSpeed's universal format once (cached beside it)."""
    name = f"{where.tag}.universal"
    final, tmp = where.ckpt_dir / name, where.ckpt_dir / f"{ckpt.TMP}{name}"
    if info.is_main and not final.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        to_universal(where.ckpt_dir / where.tag, tmp)
        tmp.rename(final)
    barrier()
    return name


def _check_feature_shards(shards: list, val_shards: list, cfg: RunConfig, model: VLM) -> str | None:
    """Refuse feature shards (data/features.py) the model cannot take in place of its tower's output (a tower
    that trains, another tower or other weights); a line for the log if the train or val shards hold some."""
    notes, fingerprint = [], None
    for what, found in (("train", shards), ("val", val_shards)):
        record = features_record(found)
        if record is None:
            continue
        fingerprint = fingerprint or tower_fingerprint(model.vision.tower)  # once: ~0.3 s at base
        try:
            check_features(record, cfg.model.vision, fingerprint)
        except FeatureError as err:
            raise ConfigError(f"{what} shards: {err}") from None
        notes.append(f"{what} shards hold precomputed tower features ({record['dtype']}): the tower does not run on them")
    return "; ".join(notes) or None


def setup(cfg: RunConfig, opts: RunOptions, make_engine=Engine) -> Run:
    """`make_engine(model, ds)`: the engine adapter (train/engine.py), or a stand-in with its methods. Rank 0
    holds the run folder's lock (train/runlock.py) from here until `train` ends, or until setup fails."""
    info = init_distributed()
    lock, note = hold_run_dir(Path(opts.run_dir), info)
    try:
        run = _build(cfg, opts, make_engine, info)
    except BaseException:
        release(lock)
        raise
    if note:
        run.log.info(note)
    run.lock = lock
    return run


def _build(cfg: RunConfig, opts: RunOptions, make_engine, info: DistInfo) -> Run:
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is not set: pass --train-shards DIR_OR_PATTERN (see `vlm-dist shard-coco`)")
    ds = load_ds_config(opts.ds, opts.ds_overrides)
    micro, accum, global_batch = batch_geometry(ds, info.world_size)
    run_dir = Path(opts.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    quiet = ConsoleLogger() if info.is_main else NullLogger()
    where = _resume_point(opts, ckpt_dir, info, quiet)

    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cfg.train.generate_every and cfg.data.val_shards and stage < 3:  # fail now, not at the first generation eval
        try:
            import pycocoevalcap  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"train.generate_every={cfg.train.generate_every} scores captions with pycocoevalcap, which cannot be "
                f"imported ({err}): install the eval extra (pip install -e '.[eval]'), or set train.generate_every=0"
            ) from err
    compile_note = None
    if cfg.model.compile and stage >= 3:  # ZeRO-3 gathers each layer's weights in hooks dynamo cannot trace
        cfg = cfg.model_copy(deep=True)
        cfg.model.compile = False
        compile_note = ("model.compile=true is not used under ZeRO-3 (its parameter-gathering hooks cannot be "
                        "compiled): the model runs eager. Use ZeRO-1/2 to compile it")
    shards = resolve_shards(cfg.data.train_shards)  # once: without a manifest this scans the tars
    shape = resume.run_shape(cfg, micro, accum, info.world_size, shards, stage, ds)
    elastic, universal_tag = None, None
    if where is not None:
        elastic = _check_resume(where, shape, cfg, opts, quiet)
        if elastic is not None:  # the same streams and global batch on this world size
            cfg = cfg.model_copy(deep=True)
            if elastic.streams_per_rank > 1 or cfg.data.num_workers > 1:
                cfg.data.num_workers = elastic.streams_per_rank
            ds["gradient_accumulation_steps"] = elastic.accumulation
            ds.pop("train_batch_size", None)
            ds.setdefault("checkpoint", {})["load_universal"] = True
            micro, accum, global_batch = batch_geometry(ds, info.world_size)
            shape = resume.run_shape(cfg, micro, accum, info.world_size, shards, stage, ds)
            universal_tag = _universal_copy(where, info)

    train_loader = build_loader(cfg, shards, rank=info.rank, world_size=info.world_size,
                                micro_batch=micro, train=True)
    val_loader = None
    val_shards = resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else []  # once, as the train shards
    if cfg.data.val_shards:
        val_loader = build_loader(cfg, val_shards, rank=info.rank, world_size=info.world_size,
                                  micro_batch=micro, train=False)
    steps_per_epoch = train_loader.batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch gives each rank {train_loader.batches_per_epoch} micro-batches, fewer than "
            f"gradient_accumulation_steps={accum}: use more data, fewer ranks, or a smaller accumulation"
        )
    if cfg.train.max_steps is not None:
        total, how = cfg.train.max_steps, f"--max-steps / train.max_steps={cfg.train.max_steps}"
    elif cfg.data.resampled:
        raise ConfigError("data.resampled=true streams forever: set --max-steps (train.max_steps)")
    else:
        total = cfg.train.epochs * steps_per_epoch
        how = f"train.epochs={cfg.train.epochs} x {steps_per_epoch} steps/epoch"
    note = resolve_schedule(ds, total, how)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VLM(fetch_once(cfg.model, local_rank=info.local_rank, device=info.device))
    features = _check_feature_shards(shards, val_shards, cfg, model)
    engine = make_engine(model, ds)
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # dropout streams differ per rank
    state = ckpt.TrainState()
    if where is not None:
        state = ckpt.load(engine, where, tag=universal_tag)  # restores each rank's RNG states too
        if elastic is not None:
            state.batch_in_epoch = elastic.batch_in_epoch
            barrier()
            if info.is_main:  # loaded into every rank: the converted copy is no longer needed
                shutil.rmtree(where.ckpt_dir / universal_tag, ignore_errors=True)

    log = make_logger(info.rank, run_dir, cfg.log.tensorboard, total, state.step)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
    log.info(f"world size {info.world_size} on {info.device}, {precision(ds)}, ZeRO stage {stage}; global batch "
             f"{global_batch} = {micro} micro x {accum} accumulation x {info.world_size} ranks; {total} steps ({how})")
    log.info(f"train data: {train_loader.describe()}")
    if features:
        log.info(features)
    log.info(ds["_precision"])  # what bf16.enabled="auto" resolved to, and why
    if compile_note:
        log.info(compile_note)
    if note:
        log.info(note)
    if where is not None:
        log.info(f"resumed from {where.ckpt_dir / where.tag} at step {state.step} (epoch {state.epoch}, "
                 f"batch {state.batch_in_epoch})")
    stop_at = total if opts.stop_after is None else min(total, state.step + opts.stop_after)
    samples_dir = None
    if cfg.log.sample_keys:
        samples_dir = run_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(samples_dir / f"rank{info.rank}.jsonl", state.step)  # each step once after a resume
    grads = GradObserver(engine.module, cfg.log.grad_stats_every, cfg.log.histograms_every,
                         gather_grad=engine.full_grad, gather_param=engine.full_param)
    return Run(cfg, opts, info, engine, train_loader, val_loader, accum, steps_per_epoch, total, log, ckpt_dir,
               state, shape, stop_at, StopRequest(cfg.train.stop_signals), StepTimer(info.device), grads,
               peak_flops(info.device), samples_dir=samples_dir, poison=_poisoned_steps(info.rank))
