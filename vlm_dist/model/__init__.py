"""The model: imports torch and open_clip only (no DeepSpeed, distributed, data or logging)."""

from vlm_dist.model.decoder import KVCache
from vlm_dist.model.vlm import VLM

__all__ = ["VLM", "KVCache"]
