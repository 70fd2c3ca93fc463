"""Multi-token prediction heads (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction").

Head 0 is the ordinary next-token head: the trunk's final norm and the LM head. Head k >= 1 predicts
token t+1+k with one extra transformer block over the trunk's last hidden state and its own final
norm; every head shares the LM head's unembedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_dist.config import ModelConfig
from vlm_dist.model.decoder import Block, KVCache


class ExtraHeads(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.n_future - 1
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.attention) for _ in range(n)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(n))
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, first_layer: int = 0) -> list[torch.Tensor]:
        """Trunk hidden states (B, T, D) -> one normalised (B, T, D) per extra head (t+2, t+3, ...)."""
        outs = []
        for k, (block, norm) in enumerate(zip(self.blocks, self.norms)):
            if self.checkpointing and self.training and cache is None:
                z = checkpoint(block, h, use_reentrant=False)
            else:
                z = block(h, cache, first_layer + k)
            outs.append(norm(z))
        return outs

    def decode_at(self, h: torch.Tensor, cache: KVCache, first_layer: int, at: torch.Tensor) -> torch.Tensor:
        """Inference: every extra head's normalised state at one position per row, (n-1, B, D), from trunk
        states h (B, T, D) at positions `at` (B,) of these T (the cache holds each row's earlier ones).
        Their caches still get all T positions (`Block.decode_at`)."""
        B, T, _ = h.shape
        S = max(cache.lengths) + T
        ends = torch.tensor(cache.lengths, device=h.device) + at  # (B,) absolute position of each query
        mask = (torch.arange(S, device=h.device)[None, :] <= ends[:, None])[:, None, None]  # (B, 1, 1, S)
        return torch.stack([F.layer_norm(block.decode_at(h, cache, first_layer + k, at, mask), norm.normalized_shape,
                                         norm.weight, norm.bias, norm.eps)
                            for k, (block, norm) in enumerate(zip(self.blocks, self.norms))])
