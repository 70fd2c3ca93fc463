"""What tools/bench_engine.py's two parts share: device choice, the DeepSpeed config, the model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def setup_device(device: str) -> str:
    """Pick cpu/cuda before deepspeed is imported (its accelerator is chosen at import); fail fast."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu")
    device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    os.environ["DS_ACCELERATOR"] = device
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return device


def ds_config(stage: int, precision: str, micro: int) -> dict:
    from vlm_dist.train.dsconfig import load_ds_config

    ds = load_ds_config(REPO / "ds_configs" / "demo_zero2.json")
    ds.pop("scheduler", None)  # constant lr: the plain loop has no scheduler
    ds["gradient_clipping"] = 0.0  # off on both sides
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["zero_optimization"]["stage"] = stage
    ds["train_micro_batch_size_per_gpu"] = micro
    return ds


def build_model(preset: str, state: dict | None, device):
    import torch
    from vlm_dist.config import load_config
    from vlm_dist.model.vlm import VLM

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = VLM(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    return cfg, model.to(device).train()

