"""The training loop against a plain-PyTorch stand-in for the engine adapter (train/engine.py): the loop
needs nothing from DeepSpeed but the adapter's methods, and the adapter adds nothing to the math —
one rank, fp32: the DeepSpeed ZeRO-2 engine and torch.optim.AdamW + clip_grad_norm_ give the same
losses, and the stand-in resumes exactly through the same checkpoint protocol."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from tests.helpers import losses, make_demo_shards, metrics, set_one_rank_env
from vlm_dist.config import load_config
from vlm_dist.observe.logger import RunLogger
from vlm_dist.train.engine import Engine, param_groups
from vlm_dist.train.loop import RunOptions, train

pytestmark = pytest.mark.slow  # two short in-process runs each


class TorchEngine:
    """The adapter's interface on one process with plain PyTorch (the LR schedule is DeepSpeed's class,
    a torch LRScheduler, so both runs follow the same curve)."""

    dtype, zero_stage, rank = torch.float32, 0, 0

    def __init__(self, model: torch.nn.Module, ds: dict):
        self.module = model
        hp = ds["optimizer"]["params"]
        self.opt = torch.optim.AdamW(param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=hp["betas"],
                                     eps=hp["eps"])
        sp = ds["scheduler"]["params"]
        self.sched = WarmupCosineLR(self.opt, total_num_steps=sp["total_num_steps"],
                                    warmup_num_steps=sp["warmup_num_steps"], warmup_min_ratio=sp["warmup_min_ratio"],
                                    cos_min_ratio=sp["cos_min_ratio"])
        self.accum, self.clip = ds.get("gradient_accumulation_steps", 1), ds["gradient_clipping"]
        self.micro, self.norm = 0, None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self) -> bool:
        self.micro += 1
        if self.micro % self.accum:
            return True
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        applied = math.isfinite(self.norm)
        if applied:
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return applied

    def lr(self):
        return self.opt.param_groups[0]["lr"]

    def grad_norm(self):
        return self.norm

    def loss_scale(self):
        return 1.0

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    @staticmethod
    def full_grad(p):
        return p.grad

    @staticmethod
    def full_param(p):
        return p.detach()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "micro": self.micro}, ckpt_dir / tag / "torch_engine.pt")

    def load(self, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
        state = torch.load(ckpt_dir / tag / "torch_engine.pt", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.micro = state["micro"]
        return {}


@pytest.fixture()
def one_rank(monkeypatch, tmp_path):
    set_one_rank_env(monkeypatch)
    return make_demo_shards(tmp_path / "data", n_train=32, n_val=8)


def run(shards, run_dir, make_engine=Engine, stop_after=None, extra=(), ds=()):
    cfg = load_config("tiny", [f"data.train_shards={shards / 'train'}", "train.max_steps=6", "train.save_every=3",
                               "log.grad_stats_every=2", "log.tensorboard=false", *extra])
    opts = RunOptions(ds="ds_configs/zero2.json", run_dir=str(run_dir), stop_after=stop_after,
                      ds_overrides=["bf16.enabled=false", "optimizer.params.lr=0.002", "train_micro_batch_size_per_gpu=4",
                                    "scheduler.params.warmup_num_steps=2", *ds])
    return train(cfg, opts, make_engine=make_engine)


def test_loop_with_a_plain_torch_engine_equals_deepspeed(one_rank, tmp_path):
    run(one_rank, tmp_path / "ds")
    run(one_rank, tmp_path / "torch", TorchEngine)
    ds, plain = losses(tmp_path / "ds"), losses(tmp_path / "torch")
    assert sorted(ds) == sorted(plain) == list(range(1, 7))
    assert plain[6] < plain[1]
    for step in ds:
        assert abs(ds[step] - plain[step]) <= 1e-5, (step, ds[step], plain[step])


@pytest.mark.slow
def test_compiled_model_trains_through_the_loop_as_eager_does(one_rank, tmp_path):
    """model.compile=true through the real loop and loader: batches of varying text length (dynamo
    recompiles once, then treats the length as dynamic), validation without gradients, checkpoint saves;
    no graph break anywhere (each region stays one graph), and the losses follow eager's to float
    reassociation."""
    from torch._dynamo.utils import counters

    extra = (f"data.val_shards={one_rank / 'val'}", "train.eval_every=3")
    run(one_rank, tmp_path / "eager", extra=extra)
    counters.clear()
    run(one_rank, tmp_path / "compiled", extra=(*extra, "model.compile=true"))
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, 7))
    for step in eager:
        assert abs(eager[step] - compiled[step]) <= 1e-4 * abs(eager[step]), (step, eager[step], compiled[step])
    vals = [[r["loss"] for r in metrics(d, "val")] for d in (tmp_path / "eager", tmp_path / "compiled")]
    assert len(vals[0]) == len(vals[1]) == 2 and all(abs(a - b) <= 1e-4 * a for a, b in zip(*vals))
    # After those compilations, a checkpointed model of other shapes (and a block that hides the image): a
    # compiled call inside torch.utils.checkpoint once recomputed through another graph than its forward
    # here and saved other tensors (CheckpointError); the checkpoint now sits inside the compiled graph.
    from tests.test_model import test_compiled_regions_give_the_eager_loss_gradients_and_logits as model_check

    model_check()


def test_plain_torch_engine_resumes_through_the_checkpoint_protocol(one_rank, tmp_path):
    run(one_rank, tmp_path / "whole", TorchEngine)
    run(one_rank, tmp_path / "resumed", TorchEngine, stop_after=3)
    assert (tmp_path / "resumed" / "checkpoints" / "step3" / "torch_engine.pt").is_file()
    run(one_rank, tmp_path / "resumed", TorchEngine)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert all(abs(whole[s] - resumed[s]) <= 1e-6 for s in whole), (whole, resumed)


def test_losses_read_only_on_logging_steps_and_logged_values_unchanged(one_rank, tmp_path, monkeypatch):
    """With log_every=4 the step reads its losses on the host (reduce_losses, the step's one device
    sync) only at steps 4 and 6 (the last), and logs there exactly what a log_every=1 run logs."""
    from tests.helpers import metrics
    from vlm_dist.train import loop

    shown: list[dict] = []  # what the progress line showed at each step
    monkeypatch.setattr(RunLogger, "progress", lambda self, step, total, **fields: shown.append({"step": step, **fields}))

    def run_logging(run_dir: Path, every: int) -> list[int]:
        read_at: list[int] = []
        real = loop.reduce_losses

        def counted(run_, head_losses, host=()):
            read_at.append(run_.state.step + 1)
            return real(run_, head_losses, host)
        monkeypatch.setattr(loop, "reduce_losses", counted)
        cfg = load_config("tiny", [f"data.train_shards={one_rank / 'train'}", "train.max_steps=6", "train.save_every=100",
                                   f"log.log_every={every}", "log.grad_stats_every=100", "log.tensorboard=false"])
        opts = RunOptions(ds="ds_configs/zero2.json", run_dir=str(run_dir),
                          ds_overrides=["bf16.enabled=false", "train_micro_batch_size_per_gpu=4"])
        train(cfg, opts)
        return read_at

    assert run_logging(tmp_path / "every1", 1) == [1, 2, 3, 4, 5, 6]
    shown.clear()
    assert run_logging(tmp_path / "every4", 4) == [4, 6]
    # before the first read the line shows no loss (it once showed "loss=nan"), then the last one read
    assert [s["step"] for s in shown] == [1, 2, 3, 4, 5, 6] and all("loss" not in s for s in shown[:3])
    every1 = {r["step"]: r for r in metrics(tmp_path / "every1") if r["split"] == "train"}
    every4 = {r["step"]: r for r in metrics(tmp_path / "every4") if r["split"] == "train"}
    assert sorted(every4) == [4, 6]
    for step in (4, 6):
        for key in ("loss", "loss_head0", "loss_head1", "grad_norm", "lr"):
            assert every4[step][key] == every1[step][key], (step, key)
    assert [s["loss"] for s in shown[3:]] == [every4[4]["loss"], every4[4]["loss"], every4[6]["loss"]]


def test_keep_epochs_prunes_all_but_the_newest_epoch_checkpoints(one_rank, tmp_path):
    """train.keep_epochs=2 keeps the two newest epoch tags (and keep_last the step tags), as the demo does;
    the default (null) keeps every epoch."""
    extra = ["train.max_steps=null", "train.epochs=4", "train.eval_every=1000", "train.save_every=1000"]
    run(one_rank, tmp_path / "all", TorchEngine, extra=extra)
    run(one_rank, tmp_path / "two", TorchEngine, extra=[*extra, "train.keep_epochs=2"])
    tags = {name: sorted(p.name for p in (tmp_path / name / "checkpoints").glob("epoch*")) for name in ("all", "two")}
    assert tags["all"] == ["epoch1", "epoch2", "epoch3", "epoch4"]
    assert tags["two"] == ["epoch3", "epoch4"]
    assert losses(tmp_path / "all") == losses(tmp_path / "two")  # pruning changes nothing else


def test_an_undecodable_validation_image_neither_ends_nor_skews_the_run(one_rank, tmp_path, capfd):
    """A val shard whose first .jpg is an error page: validation keeps it as masked padding (warned), and the
    in-training generation eval, which scores every image it reads, is skipped with a warning; the run trains
    all its steps."""
    import shutil
    import tarfile

    from vlm_dist.data.tario import TarWriter

    val = tmp_path / "val"
    shutil.copytree(one_rank / "val", val)
    tar = next(val.glob("*.tar"))
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    first = sorted(name for name, _ in members if name.endswith(".jpg"))[0]
    with TarWriter(tar) as w:
        for name, data in members:
            w.add(name, b"<html>404</html>" if name == first else data)
    out = run(one_rank, tmp_path / "run", make_engine=TorchEngine,
              extra=[f"data.val_shards={val}", "train.eval_every=3", "train.generate_every=3", "train.generate_images=4"])
    assert out["state"]["step"] == 6
    err = capfd.readouterr()
    text = err.out + err.err
    assert f"sample '{first.split('.')[0]}'" in text and "its image does not decode" in text
    assert "generation eval skipped" in text
    vals = metrics(tmp_path / "run", split="val")
    assert vals and all(math.isfinite(m["loss"]) for m in vals)


@pytest.mark.parametrize("at_step,finished", [(6, True), (3, False)])
def test_a_stop_at_the_last_step_finishes_and_one_on_a_save_step_saves_once(one_rank, tmp_path, at_step, finished):
    """SIGTERM during step 6 of 6: the run is complete and saved, so it ends as finished (exit 0, not 75, which
    the SLURM recipe requeues). During step 3, a scheduled save step (save_every 3): it stops there, saving
    step3 once, not twice inside the grace period."""
    import os
    import signal

    from vlm_dist.train.loop import Preempted

    saves = []

    class SignalledEngine(TorchEngine):
        def __call__(self, *args, **kwargs):
            if self.module.training and self.micro + 1 == at_step:  # step `at_step`'s forward (accumulation 1)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(*args, **kwargs)

        def save(self, ckpt_dir, tag, client_state):
            saves.append(tag)
            super().save(ckpt_dir, tag, client_state)

    if finished:
        out = run(one_rank, tmp_path / "run", SignalledEngine)
        assert out["state"]["step"] == 6 and not out["stopped_early"]
    else:
        with pytest.raises(Preempted, match="saved step3 at step 3"):
            run(one_rank, tmp_path / "run", SignalledEngine)
    assert saves.count(f".tmp-step{at_step}") == 1, saves  # the engine writes into .tmp-TAG, published once complete


def test_a_fresh_start_in_a_used_run_dir_hides_the_old_runs_tensorboard_curves(one_rank, tmp_path):
    """--resume none where a run already logged 6 steps: TensorBoard, like metrics.jsonl, shows only the new run
    (3 steps under another learning rate), not the old run's steps 4-6 beside it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlm_dist.train.setup import RunOptions

    def go(lr, **kw):
        cfg = load_config("tiny", [f"data.train_shards={one_rank / 'train'}", "train.max_steps=6", "train.save_every=3",
                                   "log.log_every=1"])
        opts = RunOptions(ds="ds_configs/zero2.json", run_dir=str(tmp_path / "run"), ds_overrides=[
            "bf16.enabled=false", f"optimizer.params.lr={lr}", "train_micro_batch_size_per_gpu=4"], **kw)
        train(cfg, opts, make_engine=TorchEngine)

    go(0.002)
    go(0.02, resume="none", stop_after=3)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_a_learning_rate_changed_on_resume_applies_from_the_first_resumed_step(one_rank, tmp_path):
    """DeepSpeed's engine, one rank: stopped at step 3 with lr 0.002 and resumed with 0.02, the run trains step 4 at
    the rate a fresh 0.02 run has there (the loaded optimizer's groups held the old run's, and the scheduler
    writes the new one only after a step)."""
    def lrs(path):
        return {m["step"]: m["lr"] for m in metrics(path)}

    fresh = ["optimizer.params.lr=0.02"]
    run(one_rank, tmp_path / "fresh", extra=["log.log_every=1"], ds=fresh)
    run(one_rank, tmp_path / "resumed", stop_after=3, extra=["log.log_every=1"])
    run(one_rank, tmp_path / "resumed", extra=["log.log_every=1"], ds=fresh)
    want, got = lrs(tmp_path / "fresh"), lrs(tmp_path / "resumed")
    assert got[3] != want[3] and all(got[s] == want[s] for s in (4, 5, 6)), (got, want)


def test_a_second_job_in_a_run_folder_in_use_is_refused(one_rank, tmp_path):
    """While a job holds RUN/.lock, another training in that folder stops with a ConfigError (exit 2) naming the
    holder, before it touches checkpoints/; the lock is given back when a run ends, and when its setup fails."""
    from vlm_dist.config import ConfigError
    from vlm_dist.train.checkpoint import CheckpointError
    from vlm_dist.train.dist import DistInfo
    from vlm_dist.train.runlock import hold_run_dir, release

    rank0 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    held, _ = hold_run_dir(tmp_path / "run", rank0)
    with pytest.raises(ConfigError, match=r"in use by another training job \(pid \d+ on .*, since "):
        run(one_rank, tmp_path / "run", TorchEngine)
    assert not (tmp_path / "run" / "checkpoints").exists()
    release(held)
    run(one_rank, tmp_path / "run", TorchEngine, stop_after=3)
    with pytest.raises(CheckpointError, match="another shape") as failed:  # setup fails after taking the lock
        run(one_rank, tmp_path / "run", TorchEngine, ds=["train_micro_batch_size_per_gpu=64"])
    again, _ = hold_run_dir(tmp_path / "run", rank0)  # free: both runs gave it back (the failed one's frames live on)
    assert failed.traceback
    assert again is not None
    release(again)


def test_validation_loss_is_the_mean_over_the_real_samples(monkeypatch, tmp_path):
    """6 validation samples in micro-batches of 4: the second batch is padded with 2 repeats, which validation
    must leave out. Its loss equals the mean loss of the 6 samples under the step-6 weights, computed here one
    sample at a time (no padding), and it counts 6 samples."""
    from vlm_dist.data.loader import build_loader
    from vlm_dist.data.samples import normalize_images
    from vlm_dist.model import VLM

    set_one_rank_env(monkeypatch)
    shards = make_demo_shards(tmp_path / "data", n_train=32, n_val=6, shard_size=6)
    run(shards, tmp_path / "run", TorchEngine, extra=[f"data.val_shards={shards / 'val'}", "train.eval_every=6"])
    val = metrics(tmp_path / "run", split="val")[-1]
    assert val["step"] == 6 and val["samples"] == 6

    cfg = load_config("tiny", [f"data.train_shards={shards / 'train'}"])
    model = VLM(cfg.model)
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "step6" / "torch_engine.pt", weights_only=False)["model"])
    model.eval()
    weights = torch.tensor(cfg.model.head_weights, dtype=torch.float64)
    loader = build_loader(cfg, str(shards / "val"), rank=0, world_size=1, micro_batch=1, train=False, num_workers=0)
    loader.set_epoch(0)
    with torch.no_grad():
        losses_ = [float(model(normalize_images(b["images"], cfg.model.vision.geometry["image_size"]), b["input_ids"],
                               b["targets"])["sample_losses"].double() @ weights) for b in loader]
    assert len(losses_) == 6
    assert abs(val["loss"] - sum(losses_) / 6) <= 1e-5 * abs(val["loss"]), (val["loss"], losses_)
