"""Shard COCO for training: the same code as `vlm-dist shard-coco` (see its --help).

    python tools/shard_coco.py --images coco/train2017 --ann coco/annotations/captions_train2017.json \\
        --out shards/train --workers 8
"""

import sys

import typer

from vlm_dist.cli import app

if __name__ == "__main__":
    # the subcommand itself, so that --help's usage line is this script's (`shard_coco.py [OPTIONS]`)
    typer.main.get_command(app).commands["shard-coco"](sys.argv[1:], prog_name="shard_coco.py")
