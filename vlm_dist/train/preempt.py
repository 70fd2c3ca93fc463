"""Preemption: a stop request that any rank receives becomes a checkpoint and a distinct exit on all ranks.

SLURM (`--signal`), Kubernetes and a user's `kill` send SIGTERM or SIGUSR1 some seconds before the
kill. The handler only records the request; the loop folds `requested()` into the all-reduce it does
after every optimizer step anyway, so all ranks learn of it at the same step boundary (one rank's
signal is enough), save a step checkpoint and exit with EXIT_PREEMPTED.

The DeepSpeed runner (the `deepspeed` command) dies on SIGTERM without telling its launcher, whose
ranks would then train on as orphans. Started by that launcher, a rank therefore also treats the
runner's exit (its launcher reparented) as a stop request. The supported ways to stop a job are thus
`kill -TERM <pid of deepspeed>`, a signal to its process group (`kill -TERM -- -<pgid>`; Ctrl-C goes
to the group too: a second Ctrl-C stops at once, without a checkpoint), or a signal to any rank.
DataLoader workers ignore these signals (data/loader.py): their rank stops them after saving.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; resume with --resume auto
EXIT_ERROR = 2       # an expected failure, explained in one message


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command name


class StopRequest:
    def __init__(self, signals: list[str]):
        self.reason: str | None = None
        self._previous = {name: signal.signal(getattr(signal, name), self._handle) for name in signals}
        self._launcher = os.getppid()
        self._runner = None
        try:
            if b"deepspeed.launcher.launch" in Path(f"/proc/{self._launcher}/cmdline").read_bytes():
                self._runner = _ppid(self._launcher)
        except OSError:
            pass

    def _handle(self, signum, _frame) -> None:
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt

    def requested(self) -> bool:
        if self.reason is None and self._runner is not None and _ppid(self._launcher) != self._runner:
            self.reason = f"the deepspeed runner (pid {self._runner}) exited"
        return self.reason is not None

    def close(self) -> None:
        """Put the previous handlers back (the trainer may run inside another program, e.g. a test)."""
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
