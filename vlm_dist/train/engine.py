"""The one owner of DeepSpeed in the trainer (export aside): process-group start-up and an adapter
around the ZeRO engine, so that train/loop.py reads as plain training.

    info = init_distributed()
    engine = Engine(model, ds)               # deepspeed.initialize
    out = engine(images, ids, targets)       # forward (cast images to engine.dtype first)
    engine.backward(out["loss"])
    applied = engine.step()                  # False at a boundary whose gradients were not finite
    engine.save(ckpt_dir, tag, client)       # collective: every rank writes its shards
    client = engine.load(ckpt_dir, tag)

Anything with the same methods can stand in for `Engine` (tests drive the loop with a plain-PyTorch one).
Non-finite gradients: DeepSpeed's ZeRO optimizers (stages 1-3, fp32/bf16/fp16) check the global gradient
norm inside `step()` on every rank together and skip the update (weights and optimizer state untouched,
gradients cleared, LR schedule not advanced) when it is not finite; `step()` reports that. For bf16 the
check is DeepSpeed's `bf16.check_grad_overflow` (on by default: leave it on).
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from torch import nn

from vlm_dist.train.dist import DistInfo, free_port
from vlm_dist.train.dsconfig import for_deepspeed, precision

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def init_distributed() -> DistInfo:
    """Start the process group for every way the trainer is launched (see train/dist.py)."""
    if "RANK" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accel = get_accelerator()
    backend = "nccl" if accel.device_name() == "cuda" else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        if accel.device_name() == "cpu":
            unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp) makes for
    `rank` when every rank is on this machine: ~66 MB, named from the uid and MASTER_ADDR / MASTER_PORT."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_buffer() -> None:
    """DeepSpeed never unlinks its CPU allreduce segments: every CPU run (each on its own MASTER_PORT) left
    ~66 MB of RAM per rank in /dev/shm until a reboot: 8.2 GB after a few test-suite runs here, which got
    a benchmark OOM-killed (sglang's CI saw the same: sgl-project/sglang#38638). By the time
    init_distributed returns on every rank, each has mapped every local rank's segment (shm_initialize
    opens its peers' before it returns), so after a barrier each rank unlinks its own name: the mappings
    stay valid, and the memory goes back when the last rank exits, however it exits. Every rank runs the
    barrier (CPU runs only), whether or not DeepSpeed made a segment (it does when LOCAL_SIZE = world size)."""
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (a frozen vision tower stays out of the optimizer, but inside the
    module and so inside checkpoints); no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "emb" in name or "norm" in name or ".ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, ds: dict):
    """The raw DeepSpeed engine (benchmarks and export checks use it directly; training uses `Engine`)."""
    wd = ds.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd),
                                           config=for_deepspeed(ds))
    return engine


PLANNED = ("lr", "weight_decay", "betas", "eps")  # optimizer hyperparameters a resumed run takes from its config


class Engine:
    """A DeepSpeed engine behind the handful of calls the training loop makes."""

    def __init__(self, model: nn.Module, ds: dict):
        self._ds = build_engine(model, ds)
        self.dtype = DTYPES[precision(ds)]  # the engine casts the module, not the inputs
        self.zero_stage = self._ds.zero_optimization_stage()
        self.rank = self._ds.global_rank

    @property
    def module(self) -> nn.Module:
        return self._ds.module

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """The engine scales the loss by 1/accumulation and, under ZeRO, reduces the gradients."""
        self._ds.backward(loss)

    def step(self) -> bool:
        """Optimizer step at the accumulation boundary (a no-op before it). Returns False when the
        boundary's update was skipped because the gradients were not finite."""
        boundary = self._ds.is_gradient_accumulation_boundary()
        self._ds.step()
        return self._ds.was_step_applied() if boundary else True

    def lr(self) -> float:
        return self._ds.get_lr()[0]

    def grad_norm(self) -> float | None:
        norm = self._ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float:
        """fp16 gradients carry the loss scale; 1 otherwise."""
        return float(self._ds.optimizer.loss_scale) if self._ds.fp16_enabled() else 1.0

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    # Collectives under ZeRO: every rank calls these for the same parameters in the same order.
    full_grad = staticmethod(safe_get_full_grad)
    full_param = staticmethod(safe_get_full_fp32_param)

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its files of `tag` (no `latest`: train/checkpoint.py publishes atomically)."""
        self._ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
        """Load `tag`; the optimizer goes on with this run's hyperparameters (`replan`)."""
        groups = self._optimizer_groups()
        planned = [{k: g[k] for k in PLANNED if k in g} for g in groups]  # as the config built them
        path, client = self._ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                                load_lr_scheduler_states=load_optimizer)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        if load_optimizer:
            self._untie_zero3_steps()
            self.replan(groups, planned)
        return client or {}

    def _untie_zero3_steps(self) -> None:
        """DeepSpeed 0.19.8's ZeRO-3 universal load (--elastic; stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        gives every sub-group's Adam state ONE `step` tensor; torch's AdamW adds 1 to it in place at each sub-group's
        step, so bias correction ran S times too fast (S sub-groups: 2 here) and the losses drifted from the
        uninterrupted run's (9.5e-3 at the first resumed step of the test run, growing). Each gets its own copy
        again (same value). Nothing to do under ZeRO-1/2 or after a plain load, where they are distinct."""
        zero, seen = self._ds.optimizer, set()
        for flat in getattr(zero, "fp32_partitioned_groups_flat", None) or ():
            state = zero.optimizer.state.get(flat, {})
            if torch.is_tensor(state.get("step")):
                if id(state["step"]) in seen:
                    state["step"] = state["step"].clone()
                seen.add(id(state["step"]))

    def _optimizer_groups(self) -> list[dict]:
        """The param groups the optimizer steps with (under ZeRO, those of the optimizer it wraps)."""
        opt = self._ds.optimizer
        return getattr(opt, "optimizer", opt).param_groups

    def replan(self, groups: list[dict], planned: list[dict]) -> None:
        """After a load: each group's learning rate, weight decay, betas and eps as this run's config built them,
        the learning rate as the scheduler gives it for the restored step. The optimizer's saved groups would otherwise
        win: a learning rate changed on resume took effect one step late (the scheduler writes it only after
        the next step) and weight decay, betas and eps never; and DeepSpeed's ZeRO-3 universal load (--elastic)
        copies group 0's values onto every group, weight-decaying biases and norms from then on. With
        unchanged settings every value is the one loaded, to the bit."""
        if len(groups) != len(planned):
            raise RuntimeError(f"the loaded optimizer has {len(groups)} param groups, this run {len(planned)}")
        for group, values in zip(groups, planned):
            group.update(values)
        sched = self._ds.lr_scheduler
        if hasattr(sched, "last_batch_iteration"):  # DeepSpeed's schedulers: step(i) sets iteration i's rates
            sched.step(sched.last_batch_iteration)


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Convert a ZeRO checkpoint tag to DeepSpeed's Universal Checkpoint format (rank 0 only), which
    loads on any number of ranks with `"checkpoint": {"load_universal": true}`."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as convert

    convert(Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                      num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
