"""Wall-clock sections of a training step (data wait, forward, backward, optimizer step, observation).

    timer = StepTimer(device)
    with timer("forward"):
        out = engine(...)
    timer.totals()  # {"time_forward": 0.012, ...} summed over the step's micro-batches, then reset

On a GPU the work is asynchronous: the device is synchronised before each clock read, so a section
holds the kernels it launched rather than the time to enqueue them (this costs a little overlap).
The trainer sets `exact = False` for steps whose timings are not logged: no synchronisation then (the
sections hold enqueue times, which nobody reads).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._sums: dict[str, float] = defaultdict(float)
        self.exact = True

    @contextmanager
    def __call__(self, name: str):
        sync = self.sync if self.exact else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self._sums[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        out = {f"time_{k}": v for k, v in self._sums.items()}
        self._sums.clear()
        return out
