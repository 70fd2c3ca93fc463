"""Crash-safe checkpoints under RUN/checkpoints/, written through the engine's own save/load:

    step{N}/   every train.save_every steps (and at a stop); the newest train.keep_last are kept
    epoch{E}/  at the end of each epoch; all kept, or the newest train.keep_epochs
    best/      the lowest validation loss so far (not recorded in `latest`)
    latest     the newest published step/epoch tag (DeepSpeed's pointer file, replaced atomically)
    .tmp-{tag}/  a save in progress, or one a crash interrupted: never loaded
    .old-{tag}/  the tag being replaced (e.g. the previous `best`) while the new one is published

A tag holds the engine's files (DeepSpeed: model states, one optimizer shard per rank), one
rng_rank{R}.pt per rank, run_config.json and, written last, checkpoint.json: the run position, the
run's shape (see `run_shape`) and every file of the tag with its size. Save protocol (collective):

    1. every rank writes its engine files and RNG state into .tmp-{tag}     (rank 0 cleared it first)
    2. barrier; rank 0 lists the files, checks that every rank's are there, writes checkpoint.json
       (write-then-rename)
    3. rank 0 publishes: {tag} -> .old-{tag} (if it exists), .tmp-{tag} -> {tag}, delete .old-{tag},
       replace `latest` (write-then-rename); barrier
A crash anywhere leaves the previous complete tag or the new one: `recover()` (rank 0, at start-up)
finishes an interrupted publish or undoes it, and removes incomplete saves. `--resume auto` takes the
newest tag whose checkpoint.json lists files that are all there, and says which it skipped and why.
The checkpoints folder is assumed to be shared by all nodes (one rank writes checkpoint.json).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_dist.train.dist import barrier, from_main

STEP_TAG = re.compile(r"^(step|epoch)(\d+)$")
RUN_CONFIG_FILE = "run_config.json"  # the run config beside each tag, readable without unpickling
META_FILE = "checkpoint.json"  # written last: a tag without it is incomplete
TMP, OLD = ".tmp-", ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (incomplete, made by a run of another shape) or written."""


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    batch_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    best_val: float = float("inf")
    skipped_steps: int = 0   # steps whose update was skipped (non-finite gradients), over the run
    skipped_in_a_row: int = 0  # ... the latest of them in a row: a resume continues the count toward the stop


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


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename: readers see the old content or the new, never a part."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fault(point: str, rank: int, tag: str) -> None:
    """Test hook: VLM_DIST_FAULT=POINT[:RANK]@TAG SIGKILLs the job's process group at a named point of the
    save of TAG (saved: engine+RNG files written; meta: checkpoint.json written; swap: the old tag renamed
    away, the new one not yet in place; published), as a dying node would. Unset in normal runs."""
    spec, _, at = os.environ.get("VLM_DIST_FAULT", "").partition("@")
    name, _, who = spec.partition(":")
    if name == point and at == tag and (who == "" or int(who) == rank):
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)


def save(engine, ckpt_dir: Path, tag: str, state: TrainState, config: dict, shape: dict, world_size: int,
         latest: bool = True) -> None:
    """Every rank calls this. Returns once `tag` is published, complete, on every rank."""
    rank = engine.rank
    tmp = ckpt_dir / f"{TMP}{tag}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of the same tag
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        engine.save(ckpt_dir, tmp.name, {"train_state": asdict(state), "config": config})
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as err:  # a full disk or quota: torch.save raises "iostream error" (RuntimeError)
        raise CheckpointError(f"rank {rank} could not write checkpoint {tag} into {tmp}: {err} ({_free(ckpt_dir)}). "
                              f"The tags already published are intact: make room (or lower train.keep_last) and "
                              f"continue with --resume auto") from err
    _fault("saved", rank, tag)
    barrier()
    problem = None
    if rank == 0:
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if f"rng_rank{r}.pt" not in files]
        if missing:
            problem = (f"{tmp}: {', '.join(missing)} missing after every rank saved: is {ckpt_dir} on a filesystem "
                       f"shared by all nodes?")
    problem = from_main(problem)  # every rank fails together, none waits at a barrier
    if problem:
        raise CheckpointError(problem)
    if rank == 0:
        meta = {"tag": tag, "state": asdict(state), "shape": shape, "world_size": world_size, "files": files}
        write_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
        _fault("meta", rank, tag)
        _publish(ckpt_dir, tag, fault=lambda: _fault("swap", rank, tag))
        _fault("published", rank, tag)
        if latest:
            write_atomic(ckpt_dir / "latest", tag)
    barrier()


def _free(path: Path) -> str:
    """'N GiB free on the filesystem of path', for errors about writing there."""
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free there"
    except OSError as err:
        return f"free space unknown: {err.strerror}"


def _publish(ckpt_dir: Path, tag: str, fault=lambda: None) -> None:
    final, tmp, old = ckpt_dir / tag, ckpt_dir / f"{TMP}{tag}", ckpt_dir / f"{OLD}{tag}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        fault()
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def incomplete_reason(tag_dir: Path) -> str | None:
    """None if `tag_dir` is a complete checkpoint, else why not."""
    meta = read_meta(tag_dir)
    if meta is None:
        return f"no readable {META_FILE} (its save did not finish, or a vlm-dist older than 0.2 wrote it)"
    for name, size in meta["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    return None


def recover(ckpt_dir: Path) -> list[str]:
    """Rank 0, before anything reads the folder: finish or undo an interrupted save/publish.
    Returns what it did, one line each, for the log."""
    notes: list[str] = []
    if not ckpt_dir.is_dir():
        return notes
    for tmp in sorted(ckpt_dir.glob(f"{TMP}*")):
        tag = tmp.name[len(TMP):]
        if incomplete_reason(tmp) is None and not (ckpt_dir / tag).exists():
            _publish(ckpt_dir, tag)
            notes.append(f"published {tag}: its save was complete but interrupted before publishing")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            notes.append(f"removed {tmp.name}: an interrupted save")
    for old in sorted(ckpt_dir.glob(f"{OLD}*")):
        tag = old.name[len(OLD):]
        if (ckpt_dir / tag).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(ckpt_dir / tag)
            notes.append(f"restored {tag}: its replacement was interrupted")
    tags = published_tags(ckpt_dir)
    latest = ckpt_dir / "latest"
    if tags and (not latest.is_file() or latest.read_text().strip() != tags[-1][1]):
        write_atomic(latest, tags[-1][1])  # a crash between publishing and updating `latest`
    return notes


def set_aside(ckpt_dir: Path, after_step: int) -> list[str]:
    """Rank 0, when a run starts afresh (after_step -1) or from an explicit earlier tag: move the tags of
    later steps (step/epoch/best) into RUN/checkpoints/superseded-TIME/, so that `--resume auto`, `latest`
    and pruning see only this run's trajectory. Nothing is deleted. Returns the tags moved."""
    later = [p for p in ckpt_dir.iterdir() if (STEP_TAG.match(p.name) or p.name == "best")
             and (read_meta(p) or {"state": {"step": after_step + 1}})["state"]["step"] > after_step] \
        if ckpt_dir.is_dir() else []
    if later:
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (aside := ckpt_dir / (f"superseded-{stamp}" + (f"-{n}" if n else ""))).exists():
            n += 1
        aside.mkdir()
        for path in later:
            path.rename(aside / path.name)
        (ckpt_dir / "latest").unlink(missing_ok=True)
        tags = published_tags(ckpt_dir)
        if tags:
            write_atomic(ckpt_dir / "latest", tags[-1][1])
    return sorted(p.name for p in later)


def published_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the complete step/epoch tags, oldest first (`best` is not one of them)."""
    out = []
    for path in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if STEP_TAG.match(path.name) and incomplete_reason(path) is None:
            out.append((read_meta(path)["state"]["step"], path.name))
    return sorted(out, key=lambda t: (t[0], t[1].startswith("step")))


def prune_checkpoints(ckpt_dir: Path, keep_steps: int, is_main: bool, keep_epochs: int | None = None) -> list[str]:
    """Delete all but the newest `keep_steps` step checkpoints and, unless keep_epochs is None, all but the
    newest `keep_epochs` epoch checkpoints (rank 0, after every rank finished saving). Returns the names."""
    tags: dict[str, list[tuple[int, Path]]] = {"step": [], "epoch": []}
    for p in ckpt_dir.iterdir():
        if m := STEP_TAG.match(p.name):
            tags[m.group(1)].append((int(m.group(2)), p))
    doomed = [p for _, p in sorted(tags["step"])[:-keep_steps]]
    if keep_epochs is not None:
        doomed += [p for _, p in sorted(tags["epoch"])[:-keep_epochs]]
    if is_main:
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return [p.name for p in doomed]


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    tag: str
    meta: dict
    skipped: tuple[str, ...] = ()  # "tag: why" of newer tags that were not complete


def resolve_resume(spec: str, ckpt_dir: Path) -> ResumePoint | None:
    """`none` -> None; `auto` -> the newest complete step/epoch checkpoint in `ckpt_dir`, if any; PATH ->
    a checkpoints folder (its newest complete one) or one tag folder (which must be complete)."""
    if spec == "none":
        return None
    path = ckpt_dir if spec == "auto" else Path(spec)
    if not path.is_dir():
        if spec == "auto":
            return None
        raise FileNotFoundError(f"--resume {spec}: no such folder; use --resume auto, none, RUN/checkpoints or "
                                f"RUN/checkpoints/step100")
    if (path / META_FILE).exists() or STEP_TAG.match(path.name) or path.name == "best":  # one tag
        why = incomplete_reason(path)
        if why is not None:
            raise CheckpointError(f"--resume {spec}: not a complete checkpoint: {why}; pass --resume auto to take "
                                  f"the newest complete one in {path.parent}")
        return ResumePoint(path.parent, path.name, read_meta(path))
    skipped = tuple(f"{p.name}: {why}" for p in sorted(path.iterdir())
                    if STEP_TAG.match(p.name) and (why := incomplete_reason(p)) is not None)
    tags = published_tags(path)
    if not tags:
        if spec == "auto" and not skipped:
            return None  # a new run
        raise CheckpointError(f"--resume {spec}: no complete checkpoint in {path}" +
                              (f" (skipped {'; '.join(skipped)})" if skipped else "") +
                              "; pass --resume none to start afresh")
    tag = tags[-1][1]
    return ResumePoint(path, tag, read_meta(path / tag), skipped)


def load(engine, where: ResumePoint, load_optimizer: bool = True, tag: str | None = None) -> TrainState:
    """Load `where` (or its converted copy `tag`) into the engine and this rank's RNG states, if saved."""
    engine.load(where.ckpt_dir, tag or where.tag, load_optimizer)
    rng_file = where.ckpt_dir / where.tag / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(**where.meta["state"])
