"""Command-line entry of the trainer. Tests call `main([...])` in-process or start it per rank.

    python -m vlm_dist.train --config tiny --ds ds_configs/zero2.json --train-shards DIR --run-dir runs/x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from vlm_dist.config import ConfigError, load_config
from vlm_dist.model.vision import PretrainedWeightsError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlm_dist.train",
        description="Train the VLM on a DeepSpeed ZeRO engine. Start one process per rank with the deepspeed "
        "launcher (deepspeed --num_gpus N --module vlm_dist.train ...; its launcher has no -m), torchrun, or plain python for one rank.",
    )
    p.add_argument("--config", default="demo", help="preset (tiny, demo, base) or YAML/JSON run config [demo]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--ds", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON: batch sizes, optimizer, schedule, precision, ZeRO stage [ds_configs/zero2.json]")
    p.add_argument("--ds-set", dest="ds_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DeepSpeed JSON field, e.g. --ds-set zero_optimization.stage=3 (repeatable)")
    p.add_argument("--run-dir", default="runs/default", help="holds checkpoints/, tb/, metrics.jsonl, config [runs/default]")
    p.add_argument("--train-shards", help="training shards: a shard-coco output dir, a folder of webdataset tars "
                   "(img2dataset), or a brace pattern of tars")
    p.add_argument("--val-shards", help="validation shards (same forms)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run (default: train.epochs worth)")
    p.add_argument("--eval-every", type=int, help="validate every N steps")
    p.add_argument("--save-every", type=int, help="save a step checkpoint every N steps")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in RUN/checkpoints, if any), none, or a checkpoints/tag path [auto]")
    p.add_argument("--elastic", action="store_true",
                   help="resume a checkpoint made on another number of ranks: converts it to DeepSpeed's universal format "
                   "and keeps the data streams and global batch, so training continues exactly (see vlm_dist/train/resume.py)")
    p.add_argument("--stop-after", type=_positive, default=None, metavar="N",
                   help="end this session after N optimizer steps without changing the LR schedule (for time-limited "
                   "jobs); a later run with --resume auto continues")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of steps")
    return value


def build_run_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    for flag, key in [("train_shards", "data.train_shards"), ("val_shards", "data.val_shards"),
                      ("max_steps", "train.max_steps"), ("eval_every", "train.eval_every"),
                      ("save_every", "train.save_every")]:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(args.config, overrides)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix, reported as one message (no traceback)."""
    from vlm_dist.data.loader import ShardMismatchError
    from vlm_dist.data.manifest import ShardSpecError
    from vlm_dist.train.checkpoint import CheckpointError
    from vlm_dist.train.loop import NonFiniteStop

    return ConfigError, FileNotFoundError, ShardSpecError, ShardMismatchError, CheckpointError, NonFiniteStop


def report(err: BaseException, agreed: bool) -> None:
    """One message per job: rank 0 prints what every rank hit alike; a failure of one rank's own (e.g.
    its shard is damaged) is printed by that rank, named."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not agreed:
        where = "" if agreed else f"[rank {rank}] "
        print(f"{where}error: {err}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    from vlm_dist.data.loader import ShardMismatchError
    from vlm_dist.train.dist import shutdown
    from vlm_dist.train.loop import Preempted, RunOptions, train
    from vlm_dist.train.preempt import EXIT_ERROR

    try:
        cfg = build_run_config(args)
        train(cfg, RunOptions(ds=args.ds, ds_overrides=args.ds_overrides, run_dir=args.run_dir, resume=args.resume,
                              elastic=args.elastic, stop_after=args.stop_after))
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped: {stop}", file=sys.stderr, flush=True)
        shutdown()
        return stop.exit_code
    except PretrainedWeightsError as err:  # one message per failing node, not one per rank; no traceback
        if err.report:
            print(f"error: {err}", file=sys.stderr, flush=True)
        shutdown()  # every rank learned of it together (train/weights.py)
        return EXIT_ERROR
    except expected_errors() as err:
        agreed = not isinstance(err, ShardMismatchError)
        report(err, agreed)
        if agreed:  # a rank-local failure may leave other ranks inside a collective: no teardown then
            shutdown()
        return EXIT_ERROR
    shutdown()
    return 0
