"""Wrapping the model in a DeepSpeed engine (the only place, with export, that imports deepspeed)."""

from __future__ import annotations

import deepspeed
from torch import nn

from vlm_dist.train.dsconfig import for_deepspeed


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (a frozen vision tower stays out of the optimizer, but inside the
    module and so inside checkpoints); no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "emb" in name or "norm" in name or ".ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, ds: dict):
    wd = ds.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd),
                                           config=for_deepspeed(ds))
    return engine
