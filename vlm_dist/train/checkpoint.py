"""Checkpoints through DeepSpeed's own save_checkpoint / load_checkpoint, under RUN/checkpoints/:

    step{N}/   every train.save_every steps; the newest train.keep_last are kept
    epoch{E}/  at the end of each epoch (kept)
    best/      the lowest validation loss so far (not recorded in `latest`)
    latest     DeepSpeed's pointer to the newest complete step/epoch checkpoint (`--resume auto`)

The client state carries the run position (step, epoch, micro-batches consumed in the epoch — the
same on every rank, which is all the data loader needs to continue exactly), the best validation
loss and the config. RNG states differ per rank, so each rank writes its own rng_rank{R}.pt.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_dist.train.dist import barrier

STEP_TAG = re.compile(r"^step(\d+)$")
RUN_CONFIG_FILE = "run_config.json"  # the run config beside each tag, readable without unpickling


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    batch_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    best_val: float = float("inf")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, tag: str, state: TrainState, config: dict, latest: bool = True) -> None:
    """Every rank calls this (DeepSpeed's save is collective)."""
    client = {"train_state": asdict(state), "config": config}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=latest)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{engine.global_rank}.pt")
    if engine.global_rank == 0:
        (ckpt_dir / tag / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    barrier()


def prune_step_checkpoints(ckpt_dir: Path, keep: int, is_main: bool) -> list[str]:
    """Delete all but the newest `keep` step checkpoints (rank 0, after every rank finished saving)."""
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_TAG.match(p.name)))
    doomed = [p for _, p in steps[:-keep]]
    if is_main:
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return [p.name for p in doomed]


def resolve_resume(spec: str, ckpt_dir: Path) -> tuple[Path, str | None] | None:
    """`none` -> None; `auto` -> the newest complete checkpoint if any; PATH -> a checkpoints folder
    (its `latest`) or one tag folder inside it."""
    if spec == "none":
        return None
    if spec == "auto":
        return (ckpt_dir, None) if (ckpt_dir / "latest").is_file() else None
    path = Path(spec)
    if (path / "latest").is_file():
        return path, None
    if path.is_dir() and path.parent.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(
        f"--resume {spec}: not a checkpoints folder (with a `latest` file) nor a checkpoint tag folder; "
        f"use --resume auto, none, RUN/checkpoints or RUN/checkpoints/step100"
    )


def load(engine, where: tuple[Path, str | None], load_optimizer: bool = True) -> TrainState:
    directory, tag = where
    path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {directory} (tag {tag or 'latest'})")
    rng_file = Path(path).parent / f"rng_rank{engine.global_rank}.pt"  # path: the tag folder's model-states file
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(**client["train_state"])
