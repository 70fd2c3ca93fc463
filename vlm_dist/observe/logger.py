"""The run logger. Rank gating lives here and only here: `make_logger` gives rank 0 a logger that
writes TensorBoard events (RUN/tb/), RUN/metrics.jsonl and a console progress bar; every other rank
gets a NullLogger whose methods do nothing. Warnings from any rank still go to stderr (`warn`);
`warn_once` is for a condition every rank sees alike (e.g. NaN gradients after the gathers), printed
by rank 0 alone. Images are passed as a zero-argument render function, so that only the writing logger
pays for rendering.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm


class NullLogger:
    def scalars(self, step: int, values: dict[str, float], split: str = "train") -> None: ...
    def histogram(self, step: int, tag: str, values: Any) -> None: ...
    def image(self, step: int, tag: str, render: Callable[[], Any]) -> None: ...
    def info(self, message: str) -> None: ...
    def warn_once(self, message: str) -> None: ...
    def progress(self, step: int, total: int, **fields: Any) -> None: ...
    def close(self) -> None: ...

    @staticmethod
    def warn(message: str) -> None:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


class ConsoleLogger(NullLogger):
    """Messages only (rank 0 before the run's logger exists)."""

    def info(self, message: str) -> None:
        print(message, flush=True)


def _step_of(line: str) -> int | None:
    """The step of a jsonl record; None for a line a crash cut short (dropped on truncation)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_jsonl(path: Path, after_step: int) -> int:
    """Drop the records of steps > after_step (a resumed run logs them again); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if (step := _step_of(line)) is not None and step <= after_step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(lines) - len(keep)


class RunLogger(NullLogger):
    def __init__(self, run_dir: Path, tensorboard: bool, total_steps: int, start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)  # each step once after a resume
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events a crashed session wrote past its checkpoint, and a fresh
            # start (--resume none, start_step 0) all of an earlier run's in this folder, as metrics.jsonl drops them
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stdout, disable=None)  # disable=None: no bar when stdout is not a terminal
        self._last_print = 0.0
        self._warned: set[str] = set()

    def scalars(self, step: int, values: dict[str, float], split: str = "train") -> None:
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        for key, value in values.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{key}", value, step)
        self.jsonl.write(json.dumps(record) + "\n")

    def histogram(self, step: int, tag: str, values: Any) -> None:
        """Finite values only (TensorBoard cannot bin NaN/Inf; the grad stats count them); none -> no histogram."""
        if self.tb is not None:
            values = torch.as_tensor(values.detach() if hasattr(values, "detach") else values).float().cpu()
            values = values[torch.isfinite(values)]
            if values.numel():
                self.tb.add_histogram(tag, values, step)

    def image(self, step: int, tag: str, render: Callable[[], Any]) -> None:
        """render() -> (H, W, 3) uint8 array, called only here (rank 0, TensorBoard on)."""
        if self.tb is not None:
            self.tb.add_image(tag, render(), step, dataformats="HWC")

    def info(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warn(message)

    def progress(self, step: int, total: int, **fields: Any) -> None:
        """Advance the bar to `step`; without a terminal, print a line at most every 10 s and at the end."""
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if self.bar.disable:
            now = time.monotonic()
            if now - self._last_print >= 10 or step == total:
                self._last_print = now
                print(f"step {step}/{total} {text}", flush=True)
            return
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def make_logger(rank: int, run_dir: Path, tensorboard: bool, total_steps: int, start_step: int = 0) -> NullLogger:
    return RunLogger(run_dir, tensorboard, total_steps, start_step) if rank == 0 else NullLogger()
