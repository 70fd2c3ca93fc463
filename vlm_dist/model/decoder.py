"""Decoder pieces: sinusoidal positions, causal attention (SDPA or explicit reference), pre-norm
blocks, and a preallocated KV cache shared by the trunk blocks and the multi-token heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_dist.model import packed


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions (T,) int -> (T, dim) float32: [sin(p w_0), cos(p w_0), sin(p w_1), ...] (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, half)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(positions.shape[0], 2 * half)
    return F.pad(pe, (0, dim - 2 * half))  # odd dim: last channel zero


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True: may attend) as SDPA's additive form: 0 where True, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class KVCache:
    """Keys and values of every attention layer, preallocated to max_len positions per row.

    Layers 0..n_layers-1 are the trunk blocks, the rest the extra heads' blocks. All layers of a row
    see the same positions, so one length per row serves them all: `lengths[b]` positions [0, lengths[b])
    of row b are valid. The model calls `advance` after each forward (every row grows by the T fed
    tokens); `crop` rolls rows back (rejected speculative tokens), to one length or one per row.
    While every row holds the same length (`uniform`) new keys go to one slice and attention needs no
    per-row mask; after a per-row crop (batched speculative decoding) rows are ragged: row b's new
    keys go to [lengths[b], lengths[b]+T) and a per-row mask hides the stale positions beyond them.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * batch  # python ints: decided on the host anyway, no device sync per read
        self._mask_key: tuple | None = None
        self._mask: tuple | None = None  # (bool mask, additive mask)
        self._pos_key: tuple | None = None
        self._pos: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return min(self.lengths) == max(self.lengths)

    @property
    def length(self) -> int:
        """The one length of a uniform cache."""
        if not self.uniform:
            raise ValueError(f"rows hold different lengths {self.lengths}; read cache.lengths")
        return self.lengths[0]

    def positions(self, T: int) -> torch.Tensor:
        """Absolute positions (B, T) of T tokens fed next: lengths[b] + 0..T-1 (made once per forward:
        the embedding and every layer's cache update read it)."""
        key = (T, *self.lengths)
        if key != self._pos_key:
            device = self.k.device
            self._pos = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)
            self._pos_key = key
        return self._pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) after each row's cached positions; return keys/values (B, H, S, hd)
        for S = max(lengths) + T (positions a row has not written are masked by `attn_mask`)."""
        keys, values = self.update_layers(layer, k[None], v[None])
        return keys[0], values[0]

    def update_layers(self, first: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for m consecutive layers at once: k, v (m, B, H, T, hd) -> (m, B, H, S, hd)."""
        m, T = k.shape[0], k.shape[3]
        end = max(self.lengths) + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len} (raise model.max_seq_len)")
        layers = slice(first, first + m)
        if self.uniform:
            start = self.lengths[0]
            self.k[layers, :, :, start:end] = k
            self.v[layers, :, :, start:end] = v
        else:
            rows = torch.arange(k.shape[1], device=k.device)[:, None]  # (B, 1)
            pos = self.positions(T)  # (B, T); advanced indices around a slice put (B, T) first
            self.k[layers][:, rows, :, pos] = k.permute(1, 3, 0, 2, 4)  # (B, T, m, H, hd)
            self.v[layers][:, rows, :, pos] = v.permute(1, 3, 0, 2, 4)
        return self.k[layers, :, :, :end], self.v[layers, :, :, :end]

    def attn_mask(self, T: int, additive: bool = False) -> torch.Tensor | None:
        """Which cached keys the T new queries may see: None (T = 1, uniform: all), (T, S) for a uniform
        cache, (B, 1, T, S) for a ragged one; bool, or additive (0 / -inf in the cache's dtype: what SDPA
        turns a bool mask into, on every call, otherwise). Built once per forward and shared by every layer."""
        key = (T, *self.lengths)
        if key != self._mask_key:
            S = max(self.lengths) + T
            if self.uniform:
                # query i sits at absolute position S-T+i and may see keys 0..S-T+i
                mask = torch.ones(T, S, dtype=torch.bool, device=self.k.device).tril(S - T) if T > 1 else None
            else:
                keys = torch.arange(S, device=self.k.device)
                mask = (keys[None, None, :] <= self.positions(T)[:, :, None])[:, None]  # (B, 1, T, S)
            self._mask = (mask, None if mask is None else additive_mask(mask, self.k.dtype))
            self._mask_key = key
        return self._mask[additive]

    def advance(self, n: int) -> None:
        self.lengths = [length + n for length in self.lengths]

    def crop(self, n: int | list[int]) -> None:
        """Roll back to n positions (every row) or to n[b] positions for row b."""
        new = [n] * len(self.lengths) if isinstance(n, int) else [int(x) for x in n]
        if len(new) != len(self.lengths) or any(not 0 <= a <= b for a, b in zip(new, self.lengths)):
            raise ValueError(f"cannot crop a cache of lengths {self.lengths} to {n}")
        self.lengths = new

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): finished rows leave a batch (copies the kept rows)."""
        index = torch.tensor(rows, device=self.k.device)
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.lengths = [self.lengths[r] for r in rows]
        self._mask_key = self._pos_key = None

    def set_lengths(self, lengths: list[int]) -> None:
        """Declare rows' valid lengths after a padded prefill (row b's positions past lengths[b] are
        padding, hidden from then on and overwritten by its next tokens)."""
        self.crop(lengths)


class Attention(nn.Module):
    """Causal multi-head attention. hide_image = P > 0: queries at absolute positions >= P (text) see no
    key at positions < P (the image, which the model always puts first): ModelConfig.text_first_layers."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, kind: str = "sdpa", hide_image: int = 0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.kind = kind
        self.hide_image = hide_image

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        y = self.attend(self.qkv(x), cache, layer)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def attend(self, qkv: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        """Attention of the projected qkv (B, T, 3D) over the cached keys and these: (B, H, T, hd)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, hd), S = cached + T
        S = k.shape[2]
        p = self.dropout if self.training else 0.0
        if self.hide_image:
            mask = self.text_only_mask(T, S, cache, qkv.device)
        elif self.kind == "sdpa" and S == T:  # no cached prefix: SDPA's own (top-left aligned) causal mask is right
            # is_causal for T = 1 too (a 1 x 1 causal mask is no mask): a plain bool, never a guard on T
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif cache is not None:
            mask = cache.attn_mask(T, additive=self.kind == "sdpa")
        else:  # query i sits at absolute position S-T+i and may see keys 0..S-T+i
            mask = torch.ones(T, S, dtype=torch.bool, device=qkv.device).tril(diagonal=S - T) if T > 1 else None
        if self.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return explicit_attention(q, k, v, mask, p)

    def text_only_mask(self, T: int, S: int, cache: KVCache | None, device: torch.device) -> torch.Tensor:
        """Bool mask (True: may attend) for T queries over S keys: causal, and a text query (absolute
        position >= P = hide_image) sees no image key (< P). (T, S) without a cache; (B, 1, T, S) with one,
        from each row's own positions (a ragged cache's stale keys beyond a row's position stay hidden)."""
        P, keys = self.hide_image, torch.arange(S, device=device)
        if cache is None:
            queries = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
        else:
            queries = cache.positions(T)[:, None, :, None]  # (B, 1, T, 1)
        return (keys <= queries) & ((queries < P) | (keys >= P))


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

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float, attention: str,
                 hide_image: int = 0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, attention, hide_image)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.drop = nn.Dropout(dropout)
        self.compiled = False  # True: whole-sequence forwards (training, validation) run compiled_residual()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None and not self.training:
            return self.decode(x, cache, layer)
        if cache is None and self.compiled:
            return compiled_residual()(self, x)
        return self.residual(x, cache, layer)

    def residual(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` for cached decoding (eval mode): the same kernels on the same arguments, so the same
        numbers, but through F.* instead of nn.Module calls, whose dispatch (~5 us each, 12 per block)
        was a third of a decoding step at the demo width (docs/bench/issue9_round3.md)."""
        B, T, D = x.shape
        a = self.attn
        y = a.attend(self._linear(self._norm(self.ln1, x), a.qkv), cache, layer)  # (B, H, T, hd)
        x = x + self._linear(y.transpose(1, 2).reshape(B, T, D), a.out)
        return x + self._mlp(self._norm(self.ln2, x))

    def _linear(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """lin(x) as F.linear; in bf16 on a CPU through a packed copy of the weight (model/packed.py)."""
        return packed.linear(self, x, lin.weight, lin.bias)

    @staticmethod
    def _norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        up, act, down = self.mlp
        return self._linear(F.gelu(self._linear(x, up), approximate=act.approximate), down)


_COMPILED: dict[bool, object] = {}


def _checkpointed_residual(block: Block, x: torch.Tensor) -> torch.Tensor:
    return checkpoint(block.residual, x, use_reentrant=False)


def compiled_residual(checkpointed: bool = False):
    """Block.residual under torch.compile (inductor), made once: one graph serves every block of a width
    (dynamo guards on the block's type and shapes, not on which block; blocks that hide the image compile
    their own), fusing each block's norms, bias adds, GELU and residual adds, and the layout copies
    around attention. Sequence lengths are dynamic after a second length is seen. Cached decoding never
    comes here (its lengths change every call). checkpointed=True: the activation checkpoint is inside
    the compiled function (dynamo's checkpoint operator puts the recompute in the compiled backward)."""
    if checkpointed not in _COMPILED:
        _COMPILED[checkpointed] = torch.compile(_checkpointed_residual if checkpointed else Block.residual)
    return _COMPILED[checkpointed]


def checkpointed(block: Block, x: torch.Tensor) -> torch.Tensor:
    """block(x) with activation checkpointing (non-reentrant), in training. A compiled block checkpoints
    inside its compiled graph, never a compiled call inside torch.utils.checkpoint: that recompute could
    meet another compiled graph than its forward did (after a recompilation in between) and save other
    tensors, which torch.utils.checkpoint refuses (seen in the test suite)."""
    if block.compiled:
        return compiled_residual(checkpointed=True)(block, x)
    return checkpoint(block, x, use_reentrant=False)
