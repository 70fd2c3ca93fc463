"""Data: COCO readers, the shard writer (`vlm-dist shard-coco`), the synthetic demo set
(`vlm-dist demo-data`) and the streaming loader the trainer calls.

    from vlm_dist.data import build_loader
    loader = build_loader(cfg, cfg.data.train_shards, rank=0, world_size=1, micro_batch=8, train=True)

Submodules are imported on first use, so `shard-coco` never pays for torch / open_clip.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_loader": "vlm_dist.data.loader",
    "StreamingLoader": "vlm_dist.data.loader",
    "ShardSpecError": "vlm_dist.data.manifest",
    "resolve_shards": "vlm_dist.data.manifest",
    "shard_coco": "vlm_dist.data.shard",
    "ShardError": "vlm_dist.data.shard",
    "make_demo_data": "vlm_dist.data.demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlm_dist.data' has no attribute {name!r}")
