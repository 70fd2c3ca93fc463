"""One training job per run folder: rank 0 holds an exclusive lock on RUN/.lock while the job runs.

Two jobs started on one --run-dir (a resubmitted job while the first still runs, a copied command) would both
resume from the same tag, save into the same checkpoints/ (one's recovery removing the other's unfinished save)
and rewrite each other's metrics.jsonl. An flock is released by the kernel when its holder exits, however it
exits, so a crash leaves no stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from vlm_dist.config import ConfigError
from vlm_dist.train.dist import DistInfo, from_main

LOCK_FILE = ".lock"


def hold_run_dir(run_dir: Path, info: DistInfo) -> tuple[IO | None, str | None]:
    """Every rank calls this. Rank 0 takes the lock and returns (the open lock file: keep it open, `release` at
    the end; a note when the filesystem has no locks); other ranks get (None, None). If another job holds it,
    every rank raises the same ConfigError, naming that job."""
    held, note, problem = None, None, None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        held = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            holder = held.read().strip() or "holder unknown"
            held.close()
            held = None
            problem = (f"{run_dir} is in use by another training job ({holder}): two jobs in one run folder would "
                       f"overwrite each other's checkpoints and logs. Give this one its own --run-dir, or stop the other first")
        except OSError as err:  # a filesystem without flock (some network mounts): run unguarded, and say so
            note = f"{run_dir}: no lock taken ({err.strerror}): make sure no other job trains in this folder"
        else:
            held.seek(0)
            held.truncate()
            held.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            held.flush()
    problem = from_main(problem)
    if problem:
        raise ConfigError(problem)
    return held, note


def release(held: IO | None) -> None:
    """Give the lock back (closing the file releases it); None: nothing held."""
    if held is not None:
        held.close()
