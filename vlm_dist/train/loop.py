"""The training loop: train() -> run_epoch() -> train_step() -> forward_backward(), plus evaluate().

    deepspeed --num_gpus 2 --module vlm_dist.train --config demo --ds ds_configs/zero2.json \
        --train-shards data/demo/shards/train --val-shards data/demo/shards/val --run-dir runs/demo

Each optimizer step consumes `gradient_accumulation_steps` micro-batches on every rank; the engine
(train/engine.py, the only DeepSpeed caller) owns accumulation, clipping, the optimizer and the LR
schedule, and skips an update whose gradients are not finite. The run position (step, epoch,
micro-batches consumed in the epoch) is enough to resume exactly: the loader replays the epoch from
there (see vlm_dist/data/loader.py). After every step one small all-reduce over gloo gives all ranks
the token and FLOP counts and any stop request (train/preempt.py) at once; these live on the host,
so it never waits for the device. The losses stay on the device and are read (reduced over the ranks,
one host sync) only on the steps that need them (`losses_due`: the steps that log, or whose
non-finite loss must be acted on), so a GPU runs step after step without waiting for the host.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import torch

from vlm_dist.config import RunConfig
from vlm_dist.data.samples import is_pixels, normalize_images
from vlm_dist.observe.flops import memory_metrics, throughput_metrics, train_flops
from vlm_dist.observe.tokens import EvalRecorder
from vlm_dist.text import IGNORE_INDEX
from vlm_dist.train import checkpoint as ckpt
from vlm_dist.train.dist import all_reduce_sum, all_reduce_sum_host, barrier
from vlm_dist.train.engine import Engine
from vlm_dist.train.preempt import EXIT_PREEMPTED
from vlm_dist.train.runlock import release
from vlm_dist.train.setup import Run, RunOptions, setup

__all__ = ["RunOptions", "train", "NonFiniteStop", "Preempted"]


class NonFiniteStop(FloatingPointError):
    """Too many non-finite steps in a row (or the first one, with train.on_nonfinite=stop)."""


class Preempted(RuntimeError):
    """A stop was requested (signal); a checkpoint was written. Exit code EXIT_PREEMPTED."""
    exit_code = EXIT_PREEMPTED


def to_device(batch: dict, run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = run.info.device
    # Images travel as uint8 (a quarter of float32's bytes) and are normalised on the device, in float32 as
    # open_clip's transform does; the engine casts the module to bf16/fp16, not the inputs: images must
    # follow. Token ids stay integer.
    images = batch["images"].to(dev, non_blocking=True)
    if is_pixels(images):  # else the frozen tower's precomputed tokens (data/features.py)
        images = normalize_images(images, run.cfg.model.vision.geometry["image_size"])
    if batch.get("poisoned"):  # test hook (RunOptions.poison): NaN images, made after the uint8 -> float step
        images = images * float("nan")
    return (images.to(run.engine.dtype), batch["input_ids"].to(dev, non_blocking=True),
            batch["targets"].to(dev, non_blocking=True))


def forward_backward(run: Run, batch: dict) -> torch.Tensor:
    images, ids, targets = to_device(batch, run)
    with run.timer("forward"):
        out = run.engine(images, ids, targets)
    with run.timer("backward"):
        run.engine.backward(out["loss"])
    return out["head_losses"].detach().float()


def micro_batch_flops(run: Run, batch: dict) -> float:
    B, T = batch["input_ids"].shape
    n_targets = int((batch["targets"] != IGNORE_INDEX).sum())  # over all heads: the LM head runs only there
    return train_flops(run.cfg.model, run.engine.module.vocab_size, B, T, n_targets,
                       tower=is_pixels(batch["images"]))  # else precomputed features: no tower forward


def next_batches(run: Run, batches) -> tuple[list[dict], float]:
    """The step's `accum` micro-batches and the time spent waiting for them."""
    out, wait = [], 0.0
    for i in range(run.accum):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        if i == 0 and run.state.step + 1 in run.poison:
            batch = {**batch, "poisoned": True}  # to_device makes its images NaN (uint8 holds no NaN)
        out.append(batch)
    return out, wait


def losses_due(run: Run, step: int) -> bool:
    """Whether step `step` reads its losses on the host: a logging step, or one whose non-finite loss
    must be acted on before the update (the layer that went non-finite is found from the gradients,
    which the update clears), or any step of an engine that applies non-finite updates (ZeRO stage 0).
    The same on every rank (the losses are all-reduced)."""
    cfg = run.cfg
    return (step % cfg.log.log_every == 0 or step == run.total_steps or cfg.train.on_nonfinite == "stop"
            or run.state.skipped_in_a_row + 1 >= cfg.train.max_skipped_in_a_row or run.engine.zero_stage == 0)


def reduce_losses(run: Run, head_losses: torch.Tensor, host: list[float] = ()) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(per-head losses (n,) float64 and the weighted loss, averaged over the ranks; the `host` numbers
    summed over the ranks), in one all-reduce: the host sync of the step."""
    n = head_losses.numel()
    extra = torch.tensor(list(host), dtype=torch.float64, device=head_losses.device)
    summed = all_reduce_sum(torch.cat([(head_losses / run.accum).double(), extra]), run.info.device)  # on the host
    heads = summed[:n] / run.info.world_size
    return heads, float(torch.tensor(run.cfg.model.head_weights, dtype=torch.float64) @ heads), summed[n:]


def train_step(run: Run, batches) -> dict[str, float]:
    """One optimizer step over `accum` micro-batches; returns this step's metrics (over all ranks):
    the losses, grad norm and memory only on steps whose losses are read (losses_due or skipped)."""
    t0 = time.perf_counter()
    engine, state = run.engine, run.state
    read_losses = losses_due(run, state.step + 1)
    run.timer.exact = read_losses  # section times are synchronised only on the steps that log them
    lr = engine.lr()  # the rate this step applies (the scheduler advances in engine.step)
    micro, wait = next_batches(run, batches)
    head_losses, tokens, flops = 0.0, 0, 0.0
    for i, batch in enumerate(micro):
        tokens += int((batch["targets"][:, 0] != IGNORE_INDEX).sum())  # the host's copy of the batch: no sync
        flops += micro_batch_flops(run, batch)
        head_losses = head_losses + forward_backward(run, batch)  # (n,) float32 on the device
        if i < run.accum - 1:
            engine.step()  # no-op inside the accumulation window
    # Every rank, before the update: the step's counts and any stop request in one all-reduce, over gloo
    # (no device sync), or with the losses when this step reads them (one collective either way).
    host = [tokens, flops, float(run.stop.requested())]
    if read_losses:
        heads, loss, counts = reduce_losses(run, head_losses, host)
    else:
        heads, loss, counts = None, None, all_reduce_sum_host(host)
    with run.timer("observe"):
        run.grads.before_step(state.step + 1, run.log, engine.loss_scale())
        bad_layer = None
        if read_losses and not math.isfinite(loss) and (run.cfg.train.on_nonfinite == "stop" or
                                                        run.state.skipped_in_a_row + 1 >= run.cfg.train.max_skipped_in_a_row):
            bad_layer = run.grads.first_nonfinite_layer(engine.loss_scale()) or "none (the loss itself)"
    with run.timer("optimizer"):
        applied = engine.step()
    with run.timer("observe"):
        run.grads.after_step(run.log)
    state.step += 1
    state.batch_in_epoch += run.accum
    if run.cfg.log.sample_keys:
        write_sample_keys(run, micro)
    run.state.skipped_in_a_row = 0 if applied else run.state.skipped_in_a_row + 1
    state.skipped_steps += not applied
    if not applied and heads is None:  # every rank skipped it: all read the losses, for the warning and the log
        heads, loss, _ = reduce_losses(run, head_losses)
    if not applied:
        on_skipped_step(run, loss, bad_layer)
    elif loss is not None and not math.isfinite(loss):  # an engine without an overflow check (no ZeRO) applied it
        raise NonFiniteStop(f"loss is {loss} at step {state.step} and the engine applied the update (ZeRO stage "
                            f"{engine.zero_stage} does not check gradients): use ZeRO stage >= 1, lower the learning "
                            f"rate or check the data, and resume from the last checkpoint in {run.ckpt_dir}")
    elapsed = time.perf_counter() - t0
    metrics = {"lr": lr, "skipped": float(not applied), "skipped_steps": state.skipped_steps,
               "step_time": elapsed, "data_wait": wait, "tokens_per_s": float(counts[0]) / elapsed,
               "samples_per_s": run.accum * len(micro[0]["keys"]) * run.info.world_size / elapsed,
               "stop_requested": float(counts[2] > 0), **run.timer.totals(),
               **throughput_metrics(float(counts[1]), elapsed, run.info.world_size, run.peak_flops)}
    if heads is None:
        return metrics
    metrics.update({"loss": loss, **memory_metrics(run.info.device)})
    grad_norm = engine.grad_norm()  # may read a device value: only on the steps that log
    if grad_norm is not None and applied:
        metrics["grad_norm"] = grad_norm
    metrics.update({f"loss_head{k}": float(v) for k, v in enumerate(heads)})
    return metrics


def on_skipped_step(run: Run, loss: float, bad_layer: str | None) -> None:
    """The engine skipped the update (non-finite gradients on some rank): count it, or stop."""
    cfg, step = run.cfg.train, run.state.step
    if run.info.is_main:
        run.log.warn(f"step {step}: non-finite gradients (loss {loss}); the update was skipped "
                     f"({run.state.skipped_in_a_row} in a row, {run.state.skipped_steps} in the run)")
    if cfg.on_nonfinite == "stop" or run.state.skipped_in_a_row >= cfg.max_skipped_in_a_row:
        tags = ckpt.published_tags(run.ckpt_dir)
        last = f"{run.ckpt_dir / tags[-1][1]} (step {tags[-1][0]})" if tags else "none yet"
        raise NonFiniteStop(
            f"{run.state.skipped_in_a_row} step(s) in a row up to step {step} had non-finite gradients; the first layer "
            f"whose gradient went non-finite: {bad_layer or 'unknown (the loss was finite: the gradient overflowed)'}. "
            f"Last good checkpoint: {last}. Lower the learning rate or check the data, then resume; "
            f"train.max_skipped_in_a_row={cfg.max_skipped_in_a_row}, train.on_nonfinite={cfg.on_nonfinite}")


def write_sample_keys(run: Run, micro: list[dict]) -> None:
    """log.sample_keys: this rank's samples of the step (padding repeats marked), for auditing data order."""
    path = run.samples_dir / f"rank{run.info.rank}.jsonl"
    keys = [k + ("#pad" if pad else "") for b in micro for k, pad in zip(b["keys"], b["is_pad"].tolist())]
    with open(path, "a") as f:
        f.write(json.dumps({"step": run.state.step, "epoch": run.state.epoch, "keys": keys}) + "\n")


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
            pixels = normalize_images(batch["images"], images.shape[-1]) if is_pixels(batch["images"]) else None
            recorder.add(pixels, targets, pred, keep)  # float32 on the host; None: tower features, no picture
    engine.train()
    extra = recorder.position_counts() if recorder is not None else torch.zeros(0, dtype=torch.float64)
    total = all_reduce_sum(torch.cat([sums, extra.flatten()]), run.info.device)
    if recorder is not None:
        recorder.write(run.log, run.state.step, total[len(sums):].view_as(extra))
    metrics = {"loss": float(total[0] / max(total[1], 1)), "samples": float(total[1])}
    for k in range(n):
        metrics[f"token_acc_head{k}"] = float(total[2 + 2 * k] / max(total[3 + 2 * k], 1))
    return metrics


def save(run: Run, tag: str, latest: bool = True) -> None:
    """Save `tag`; a step/epoch tag (latest=True) then prunes the older ones past keep_last / keep_epochs."""
    ckpt.save(run.engine, run.ckpt_dir, tag, run.state, run.cfg.model_dump(mode="json"), run.shape,
              run.info.world_size, latest=latest)
    if latest:
        ckpt.prune_checkpoints(run.ckpt_dir, run.cfg.train.keep_last, run.info.is_main, run.cfg.train.keep_epochs)


def maybe_eval_and_save(run: Run, epoch_end: bool = False) -> str | None:
    """The step's scheduled validation, generation eval and save; returns the tag saved for this step, if any."""
    cfg, state, step = run.cfg, run.state, run.state.step
    if run.val_loader is not None and (step % cfg.train.eval_every == 0 or epoch_end):
        recorder = EvalRecorder(cfg.model.n_future, cfg.data.max_text_len - 1, cfg.log.token_images)
        metrics = evaluate(run, cfg.train.eval_batches, recorder)
        run.log.scalars(step, metrics, split="val")
        run.log.info(f"step {step}: val loss {metrics['loss']:.4f}, token acc " +
                     " ".join(f"{metrics[f'token_acc_head{k}']:.3f}" for k in range(cfg.model.n_future)))
        if metrics["loss"] < state.best_val:
            state.best_val = metrics["loss"]
            save(run, "best", latest=False)  # replaces the previous best only once complete
    if cfg.train.generate_every and step % cfg.train.generate_every == 0 and cfg.data.val_shards:
        generation_eval(run)
    if epoch_end or step % cfg.train.save_every == 0 or step in (run.total_steps, run.stop_at):
        tag = f"epoch{state.epoch}" if epoch_end else f"step{step}"
        save(run, tag)
        return tag
    return None


def generation_eval(run: Run) -> None:
    """Rank 0 decodes a few validation images with the engine's own (unpartitioned) weights while the
    other ranks wait; under ZeRO-3 no rank holds whole weights, so it is skipped (use `vlm-dist eval`
    on an export)."""
    from vlm_dist.infer.evaluate import EvalDataError, evaluate_generation

    if run.engine.zero_stage >= 3:
        run.log.warn_once("train.generate_every is ignored under ZeRO-3: export and run `vlm-dist eval` instead")
        return
    result = None
    if run.info.is_main:
        # decodes in eval mode and hands the module back in training mode (infer/generate.decoding)
        try:
            result = evaluate_generation(run.engine.module, run.cfg.data.val_shards, limit=run.cfg.train.generate_images,
                                         progress=False, meteor=False)
        except EvalDataError as err:  # e.g. an image that does not decode: training goes on
            run.log.warn(f"step {run.state.step}: generation eval skipped: {err}")
    if result is not None:
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
    shown_loss = None  # the progress bar shows the last loss read (losses_due); none yet this epoch
    try:
        while state.batch_in_epoch + run.accum <= end and state.step < run.stop_at:
            metrics = train_step(run, batches)
            if state.step % run.cfg.log.log_every == 0 or state.step == run.total_steps or metrics["skipped"]:
                run.log.scalars(state.step, metrics)
            shown_loss = metrics.get("loss", shown_loss)
            shown = {} if shown_loss is None else {"loss": shown_loss}
            run.log.progress(state.step, run.total_steps, epoch=state.epoch, **shown,
                             lr=metrics["lr"], tok_s=round(metrics["tokens_per_s"]))
            epoch_done = state.batch_in_epoch + run.accum > end
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            saved = maybe_eval_and_save(run, epoch_end=epoch_done)  # the step's scheduled eval/save first: exact resume
            if metrics["stop_requested"]:
                stop_now(run, saved)
            if epoch_done:
                return
    finally:
        del batches  # stops this epoch's DataLoader workers


def stop_now(run: Run, saved: str | None = None) -> None:
    """Every rank, at the same step: save where we are (unless this step's tag `saved` just was) and leave with
    EXIT_PREEMPTED; at the run's last step it is complete and saved, and the run ends as finished (a scheduler
    must not requeue it)."""
    reason = run.stop.reason or "on another rank"
    if run.state.step >= run.total_steps:
        run.log.info(f"stop requested ({reason}) at the run's last step: the run is complete, saved as {saved}")
        return
    t0 = time.perf_counter()
    if saved is None:
        saved = f"step{run.state.step}"
        save(run, saved)
    raise Preempted(f"stop requested ({reason}): saved {saved} at step {run.state.step} in "
                    f"{time.perf_counter() - t0:.1f} s under {run.ckpt_dir}; continue with --resume auto")


def train(cfg: RunConfig, opts: RunOptions, make_engine=Engine) -> dict:
    """Run (or resume) training; returns the final state and last metrics on every rank."""
    run = setup(cfg, opts, make_engine)
    started = time.time()
    try:
        while run.state.step < run.stop_at:
            run_epoch(run)
        if run.state.step < run.total_steps:  # --stop-after: a signal stop raises Preempted instead
            run.log.info(f"session done at step {run.state.step} of {run.total_steps} (--stop-after), its checkpoint "
                         f"saved: the same command again (--resume auto) continues")
    finally:
        run.stop.close()
        run.log.close()
        release(run.lock)
    return {"state": asdict(run.state), "seconds": time.time() - started, "total_steps": run.total_steps,
            "stopped_early": run.state.step < run.total_steps}
