"""Shared test helpers: small demo shards, and starting trainer ranks as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vlm_dist.train.dist import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def make_demo_shards(root: Path, n_train: int = 64, n_val: int = 16, shard_size: int = 16) -> Path:
    """The demo set, sharded with shard-coco: root/shards/{train,val}."""
    from vlm_dist.data.demo import make_demo_data
    from vlm_dist.data.shard import shard_coco

    for name, paths in make_demo_data(root, n_train, n_val, seed=0, side=32).items():
        shard_coco(paths["images"], [paths["captions"]], root / "shards" / name, vqa_questions=paths["vqa_questions"],
                   vqa_annotations=paths["vqa_annotations"], split=name, shard_size=shard_size, progress=False)
    return root / "shards"


def demo_export(root: Path, overrides: tuple[str, ...] = (), n_train: int = 4, n_val: int = 4,
                shard_size: int = 4) -> tuple[Path, Path]:
    """Demo shards (make_demo_shards) and ROOT/export: a random `tiny` model (with `overrides`), seed 0, exported.
    Returns (root, shards)."""
    import torch

    from vlm_dist.config import load_config
    from vlm_dist.infer.export import save_export
    from vlm_dist.model import VLM

    shards = make_demo_shards(root / "data", n_train=n_train, n_val=n_val, shard_size=shard_size)
    torch.manual_seed(0)
    save_export(VLM(load_config("tiny", list(overrides)).model).eval(), root / "export")
    return root, shards


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    env.update(extra)
    return env


def set_one_rank_env(monkeypatch) -> None:
    """The environment of a single-rank run in this process (the trainer's init_distributed reads it)."""
    for key, value in train_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)


def start_ranks(args: list[str], world: int, **extra_env: str) -> list[subprocess.Popen]:
    """Start `python -m vlm_dist.train ARGS` once per rank, torchrun-style (RANK/WORLD_SIZE/... set), all
    in one new process group (the job's: a fault hook may SIGKILL it, as a dying node would)."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        env = train_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
        group = procs[0].pid if procs else 0
        procs.append(subprocess.Popen([sys.executable, "-m", "vlm_dist.train", *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      process_group=group))
    return procs


def run_ranks(args: list[str], world: int, timeout: int = 600, expect: int | None = 0,
              **extra_env: str) -> list[subprocess.CompletedProcess]:
    """Run a job to its end; every rank must exit with `expect` (None: any code)."""
    procs = start_ranks(args, world, **extra_env)
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, r in enumerate(results):
        assert expect is None or r.returncode == expect, \
            f"rank {rank} exited with {r.returncode}, expected {expect}:\n{r.stdout[-6000:]}"
    return results


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}
