"""Decoder pieces: sinusoidal positions, causal attention (SDPA or explicit reference), pre-norm
blocks, and a preallocated KV cache shared by the trunk blocks and the multi-token heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions (T,) int -> (T, dim) float32: [sin(p w_0), cos(p w_0), sin(p w_1), ...] (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, half)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(positions.shape[0], 2 * half)
    return F.pad(pe, (0, dim - 2 * half))  # odd dim: last channel zero


class KVCache:
    """Keys and values of every attention layer for positions [0, length), preallocated to max_len.

    Layers 0..n_layers-1 are the trunk blocks, the rest the extra heads' blocks. All layers see the
    same positions, so one `length` serves them all; the model calls `advance` after each forward.
    `crop(n)` rolls back to n positions (rejected speculative tokens).
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at [length, length+T); return all keys/values so far (B, H, length+T, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len} (raise model.max_seq_len)")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {n}")
        self.length = n


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, kind: str = "sdpa") -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.kind = kind

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, hd), S = cached + T
        S = k.shape[2]
        p = self.dropout if self.training else 0.0
        if self.kind == "sdpa" and S == T:  # no cached prefix: SDPA's own (top-left aligned) causal mask is right
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=T > 1)
        else:
            # Query i sits at absolute position S-T+i and may see keys 0..S-T+i.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T) if T > 1 else None
            if self.kind == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            else:
                y = explicit_attention(q, k, v, mask, p)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V written out; the reference SDPA is tested against."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return weights @ v  # (B, H, T, hd)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float, attention: str) -> None:
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, attention)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))
