"""The training loop: train() -> run_epoch() -> train_step() -> forward_backward(), plus evaluate().

    deepspeed --num_gpus 2 --module vlm_dist.train --config demo --ds ds_configs/zero2.json \
        --train-shards data/demo/shards/train --val-shards data/demo/shards/val --run-dir runs/demo

Each optimizer step consumes `gradient_accumulation_steps` micro-batches on every rank; the engine
owns accumulation, clipping, the optimizer and the LR schedule. The run position (step, epoch,
micro-batches consumed in the epoch) is enough to resume exactly: the loader replays the epoch from
there (see vlm_dist/data/loader.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from vlm_dist.config import ConfigError, RunConfig, save_config
from vlm_dist.data.loader import build_loader
from vlm_dist.model import VLM
from vlm_dist.observe.flops import memory_metrics, peak_flops, throughput_metrics, train_flops
from vlm_dist.observe.gradstats import GradObserver
from vlm_dist.observe.logger import NullLogger, make_logger
from vlm_dist.observe.timing import StepTimer
from vlm_dist.observe.tokens import EvalRecorder
from vlm_dist.text import IGNORE_INDEX
from vlm_dist.train import checkpoint as ckpt
from vlm_dist.train.dist import DistInfo, all_reduce_sum, barrier, init_distributed
from vlm_dist.train.dsconfig import batch_geometry, load_ds_config, precision, resolve_schedule
from vlm_dist.train.engine import build_engine


@dataclass
class RunOptions:
    """What the command line adds to the config: files, paths and the resume policy."""

    ds: str = "ds_configs/zero2.json"
    ds_overrides: list[str] = field(default_factory=list)
    run_dir: str = "runs/default"
    resume: str = "auto"
    stop_after: int | None = None  # end this session after N more steps; the schedule still spans the run


@dataclass
class Run:
    """Everything a training run holds, built once by `setup`."""

    cfg: RunConfig
    opts: RunOptions
    info: DistInfo
    engine: object
    train_loader: object
    val_loader: object | None
    accum: int
    steps_per_epoch: int
    total_steps: int
    dtype: torch.dtype
    log: NullLogger
    ckpt_dir: Path
    state: ckpt.TrainState
    stop_at: int
    timer: StepTimer  # forward / backward / optimizer / observe sections of the current step
    grads: GradObserver  # per-layer gradient statistics and histograms (collectives on every rank)
    peak_flops: float | None  # the device's bf16 peak, for MFU (None on the CPU)


def setup(cfg: RunConfig, opts: RunOptions) -> Run:
    info = init_distributed()
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is not set: pass --train-shards DIR_OR_PATTERN (see `vlm-dist shard-coco`)")
    ds = load_ds_config(opts.ds, opts.ds_overrides)
    micro, accum, global_batch = batch_geometry(ds, info.world_size)
    train_loader = build_loader(cfg, cfg.data.train_shards, rank=info.rank, world_size=info.world_size,
                                micro_batch=micro, train=True)
    val_loader = None
    if cfg.data.val_shards:
        val_loader = build_loader(cfg, cfg.data.val_shards, rank=info.rank, world_size=info.world_size,
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
    model = VLM(cfg.model)
    engine = build_engine(model, ds)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(ds)]

    run_dir = Path(opts.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # dropout streams differ per rank
    state = ckpt.TrainState()
    where = ckpt.resolve_resume(opts.resume, ckpt_dir)
    if where is not None:
        state = ckpt.load(engine, where)  # restores each rank's RNG states too

    log = make_logger(info.rank, run_dir, cfg.log.tensorboard, total, state.step)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
    log.info(f"world size {info.world_size} on {info.device}, {precision(ds)}, ZeRO stage "
             f"{ds.get('zero_optimization', {}).get('stage', 0)}; global batch {global_batch} = {micro} micro x "
             f"{accum} accumulation x {info.world_size} ranks; {total} steps ({how})")
    log.info(f"train data: {train_loader.describe()}")
    log.info(ds["_precision"])  # what bf16.enabled="auto" resolved to, and why
    if note:
        log.info(note)
    if where is not None:
        log.info(f"resumed from {where[0] / (where[1] or '')} at step {state.step} (epoch {state.epoch}, "
                 f"batch {state.batch_in_epoch})")
    stop_at = total if opts.stop_after is None else min(total, state.step + opts.stop_after)
    grads = GradObserver(engine.module, cfg.log.grad_stats_every, cfg.log.histograms_every,
                         gather_grad=safe_get_full_grad, gather_param=safe_get_full_fp32_param)
    return Run(cfg, opts, info, engine, train_loader, val_loader, accum, steps_per_epoch, total, dtype, log,
               ckpt_dir, state, stop_at, StepTimer(info.device), grads, peak_flops(info.device))


def to_device(batch: dict, run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = run.info.device
    # The engine casts the module to bf16/fp16, not the inputs: images must follow; token ids stay integer.
    return (batch["images"].to(dev, run.dtype, non_blocking=True), batch["input_ids"].to(dev, non_blocking=True),
            batch["targets"].to(dev, non_blocking=True))


def forward_backward(run: Run, batch: dict) -> torch.Tensor:
    with run.timer("forward"):
        out = run.engine(*to_device(batch, run))
    with run.timer("backward"):
        run.engine.backward(out["loss"])
    return out["head_losses"].float()


def optimizer_step(run: Run, boundary: bool) -> None:
    """engine.step() steps the optimizer only at the accumulation boundary; there, the gradient
    observer reads the full gradients before it and the updated weights after it (on every rank)."""
    if boundary:
        scale = run.engine.optimizer.loss_scale if run.engine.fp16_enabled() else 1.0  # fp16 grads carry it
        with run.timer("observe"):
            run.grads.before_step(run.state.step + 1, run.log, scale)
    with run.timer("optimizer"):
        run.engine.step()
    if boundary:
        with run.timer("observe"):
            run.grads.after_step(run.log)


def micro_batch_flops(run: Run, batch: dict) -> float:
    B, T = batch["input_ids"].shape
    n_targets = int((batch["targets"] != IGNORE_INDEX).sum())  # over all heads: the LM head runs only there
    return train_flops(run.cfg.model, run.engine.module.vocab_size, B, T, n_targets)


def train_step(run: Run, batches) -> dict[str, float]:
    """One optimizer step over `accum` micro-batches; returns this step's metrics (loss over all ranks)."""
    t0 = time.perf_counter()
    lr = run.engine.get_lr()[0]  # the rate this step applies (the scheduler advances in engine.step)
    head_losses, wait, tokens, flops = 0.0, 0.0, 0, 0.0
    for i in range(run.accum):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        tokens += int((batch["targets"][:, 0] != IGNORE_INDEX).sum())
        flops += micro_batch_flops(run, batch)
        head_losses = head_losses + forward_backward(run, batch)
        optimizer_step(run, boundary=i == run.accum - 1)
    run.state.step += 1
    run.state.batch_in_epoch += run.accum
    world = run.info.world_size
    n = len(run.cfg.model.head_weights)
    summed = all_reduce_sum([*(head_losses / run.accum).tolist(), tokens, flops], run.info.device)
    heads = summed[:n] / world
    weights = torch.tensor(run.cfg.model.head_weights, dtype=torch.float64)
    elapsed = time.perf_counter() - t0
    metrics = {"loss": float((weights * heads).sum()), "lr": lr,
               "step_time": elapsed, "data_wait": wait, "tokens_per_s": float(summed[n]) / elapsed,
               "samples_per_s": run.accum * len(batch["keys"]) * world / elapsed, **run.timer.totals(),
               **throughput_metrics(float(summed[n + 1]), elapsed, world, run.peak_flops),
               **memory_metrics(run.info.device)}
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics.update({f"loss_head{k}": float(v) for k, v in enumerate(heads)})
    return metrics


@torch.no_grad()
def evaluate(run: Run, max_batches: int | None = None, recorder: EvalRecorder | None = None) -> dict[str, float]:
    """Validation loss (same weighting as training) and teacher-forced token accuracy per head, over all
    ranks; padding repeats are excluded. Every rank runs the same number of forwards (ZeRO-3 gathers).
    A `recorder` also gets position-wise accuracy and sample predictions, and logs them as images."""
    engine, cfg = run.engine, run.cfg
    n = cfg.model.n_future
    weights = torch.tensor(cfg.model.head_weights, dtype=torch.float64)
    sums = torch.zeros(2 + 2 * n, dtype=torch.float64)  # loss sum, samples, (correct, count) per head
    engine.eval()
    run.val_loader.set_epoch(0)
    for i, batch in enumerate(run.val_loader):
        if max_batches is not None and i >= max_batches:
            break
        images, ids, targets = to_device(batch, run)
        out = engine(images, ids, targets, return_logits=True)
        keep = ~batch["is_pad"].to(ids.device)  # (B,)
        sums[0] += (out["sample_losses"].double().cpu() @ weights)[keep.cpu()].sum()
        sums[1] += int(keep.sum())
        pred = out["logits"].argmax(-1)  # (B, n, T)
        valid = (targets != IGNORE_INDEX) & keep[:, None, None]
        for k in range(n):
            sums[2 + 2 * k] += int(((pred[:, k] == targets[:, k]) & valid[:, k]).sum())
            sums[3 + 2 * k] += int(valid[:, k].sum())
        if recorder is not None:
            recorder.add(batch["images"], targets, pred, keep)
    engine.train()
    extra = recorder.position_counts() if recorder is not None else torch.zeros(0, dtype=torch.float64)
    total = all_reduce_sum(torch.cat([sums, extra.flatten()]), run.info.device)
    if recorder is not None:
        recorder.write(run.log, run.state.step, total[len(sums):].view_as(extra))
    metrics = {"loss": float(total[0] / max(total[1], 1)), "samples": float(total[1])}
    for k in range(n):
        metrics[f"token_acc_head{k}"] = float(total[2 + 2 * k] / max(total[3 + 2 * k], 1))
    return metrics


def maybe_eval_and_save(run: Run, epoch_end: bool = False) -> None:
    cfg, state, step = run.cfg, run.state, run.state.step
    config = cfg.model_dump(mode="json")
    if run.val_loader is not None and (step % cfg.train.eval_every == 0 or epoch_end):
        recorder = EvalRecorder(cfg.model.n_future, cfg.data.max_text_len - 1, cfg.log.token_images)
        metrics = evaluate(run, cfg.train.eval_batches, recorder)
        run.log.scalars(step, metrics, split="val")
        run.log.info(f"step {step}: val loss {metrics['loss']:.4f}, token acc " +
                     " ".join(f"{metrics[f'token_acc_head{k}']:.3f}" for k in range(cfg.model.n_future)))
        if metrics["loss"] < state.best_val:
            state.best_val = metrics["loss"]
            ckpt.save(run.engine, run.ckpt_dir, "best", state, config, latest=False)
    if cfg.train.generate_every and step % cfg.train.generate_every == 0 and cfg.data.val_shards:
        generation_eval(run)
    if epoch_end:
        ckpt.save(run.engine, run.ckpt_dir, f"epoch{state.epoch}", state, config)
    elif step % cfg.train.save_every == 0 or step in (run.total_steps, run.stop_at):
        ckpt.save(run.engine, run.ckpt_dir, f"step{step}", state, config)
        ckpt.prune_step_checkpoints(run.ckpt_dir, cfg.train.keep_last, run.info.is_main)


def generation_eval(run: Run) -> None:
    """Rank 0 decodes a few validation images with the engine's own (unpartitioned) weights while the
    other ranks wait; under ZeRO-3 no rank holds whole weights, so it is skipped (use `vlm-dist eval`
    on an export)."""
    from vlm_dist.infer.evaluate import evaluate_generation

    if run.engine.zero_optimization_stage() >= 3:
        run.log.warn_once("train.generate_every is ignored under ZeRO-3: export and run `vlm-dist eval` instead")
        return
    if run.info.is_main:
        module = run.engine.module
        result = evaluate_generation(module, run.cfg.data.val_shards, limit=run.cfg.train.generate_images,
                                     progress=False, meteor=False)
        module.train()
        metrics = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        run.log.scalars(run.state.step, metrics, split="val_generate")
        run.log.info(f"step {run.state.step}: caption exact match {metrics['caption_exact_match']:.3f}, "
                     f"Q&A accuracy {metrics['qa_accuracy']:.3f} on {run.cfg.train.generate_images} val images")
    barrier()


def run_epoch(run: Run) -> None:
    state, loader = run.state, run.train_loader
    loader.set_epoch(state.epoch, skip_batches=state.batch_in_epoch)
    batches = iter(loader)
    end = run.steps_per_epoch * run.accum  # micro-batches past this (< accum of them) are left unused
    try:
        while state.batch_in_epoch + run.accum <= end and state.step < run.stop_at:
            metrics = train_step(run, batches)
            if state.step % run.cfg.log.log_every == 0 or state.step == run.total_steps:
                run.log.scalars(state.step, metrics)
            run.log.progress(state.step, run.total_steps, epoch=state.epoch, loss=metrics["loss"],
                             lr=metrics["lr"], tok_s=round(metrics["tokens_per_s"]))
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {state.step}: lower the learning rate "
                                         f"or check the data; the last good checkpoint is in {run.ckpt_dir}")
            if state.batch_in_epoch + run.accum > end:  # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                maybe_eval_and_save(run, epoch_end=True)
                return
            maybe_eval_and_save(run)
    finally:
        del batches  # stops this epoch's DataLoader workers


def train(cfg: RunConfig, opts: RunOptions) -> dict:
    """Run (or resume) training; returns the final state and last metrics on every rank."""
    run = setup(cfg, opts)
    started = time.time()
    try:
        while run.state.step < run.stop_at:
            run_epoch(run)
    finally:
        run.log.close()
    return {"state": asdict(run.state), "seconds": time.time() - started, "total_steps": run.total_steps,
            "stopped_early": run.state.step < run.total_steps}
