"""Multi-token prediction heads (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction").

Head 0 is the ordinary next-token head: the trunk's final norm and the LM head. Head k >= 1 predicts
token t+1+k with one extra transformer block over the trunk's last hidden state and its own final
norm; every head shares the LM head's unembedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_dist.config import ModelConfig
from vlm_dist.model import packed
from vlm_dist.model.decoder import Block, KVCache, checkpointed


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
                z = checkpointed(block, h)
            else:
                z = block(h, cache, first_layer + k)
            outs.append(norm(z))
        return outs


class FusedHeads:
    """The extra heads stacked for drafting during decoding: m = n_future - 1 blocks in ~20 kernels, not ~25 each.

        heads = FusedHeads(model.extra_heads)            # once per decode (weights fixed meanwhile)
        states = heads(h, cache, first_layer, at)        # (m, B, D): each head's state at position at[b]

    Each head's ln1 and ln2 differ only in their affine part, which folds into the next linear:
    lin(ln(x)) = (W diag(g)) norm(x) + (W b + c). So one norm and one (m*3D, D) linear give every head's
    q, k, v at all T fed positions (their keys and values go to the cache: later queries attend to them),
    and attention, output projection, MLP and final norm run for ONE position per row (`at`: the last
    accepted one), as batched matmuls over the heads. Rounding differs from ExtraHeads' by float
    reassociation only, and a draft need not be exact (a wrong guess is only rejected).
    """

    PER_HEAD_ELEMENTS = 2**20  # see per_head below

    def __init__(self, heads: ExtraHeads) -> None:
        blocks = list(heads.blocks)
        self.m = m = len(blocks)
        if m == 0:
            return
        attn = blocks[0].attn
        self.n_heads, self.head_dim = attn.n_heads, attn.head_dim
        self.approximate = blocks[0].mlp[1].approximate
        self.eps = blocks[0].ln1.eps

        def fold(lin: nn.Linear, ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
            return lin.weight * ln.weight[None, :], lin.weight @ ln.bias + lin.bias

        with torch.no_grad():
            qkv = [fold(b.attn.qkv, b.ln1) for b in blocks]
            self.qkv_w, self.qkv_b = torch.cat([w for w, _ in qkv]), torch.cat([c for _, c in qkv])  # (m*3D, D), (m*3D,)
            up = [fold(b.mlp[0], b.ln2) for b in blocks]
            self.up_w = torch.stack([w.T for w, _ in up])  # (m, D, F): x @ W^T as a bmm
            self.up_b = torch.stack([c for _, c in up])[:, None]  # (m, 1, F)
            self.out_w = torch.stack([b.attn.out.weight.T for b in blocks])  # (m, D, D)
            self.out_b = torch.stack([b.attn.out.bias for b in blocks])[:, None]
            self.down_w = torch.stack([b.mlp[2].weight.T for b in blocks])  # (m, F, D)
            self.down_b = torch.stack([b.mlp[2].bias for b in blocks])[:, None]
            self.norm_w = torch.stack([n.weight for n in heads.norms])[:, None]  # (m, 1, D)
            self.norm_b = torch.stack([n.bias for n in heads.norms])[:, None]
        # the same linears per head, (out, in) as nn.Linear holds them: in bf16 on a CPU, m packed linears
        # (model/packed.py) beat one batched matmul, whose weights oneDNN repacks on every call, where the
        # weights are large; where they are small the m - 1 extra calls cost more. On one core of the 2-core
        # EPYC (avx512_bf16), a verify call: base width (up 3072 x 768) 21.8 -> 19.7 ms, demo width (512 x 128)
        # 1.17 -> 1.26 ms (docs/bench/issue9_round10.md); hence per head from PER_HEAD_ELEMENTS in an up-projection.
        # The (out, in) weights are views of the stacked ones: no memory on any device. Made once here, so that
        # packed.linear finds the same tensors (its copies are kept per tensor) on every call.
        self.per_head = {name: [(w[k].T, b[k, 0]) for k in range(m)] for name, w, b in
                         (("out", self.out_w, self.out_b), ("up", self.up_w, self.up_b), ("down", self.down_w, self.down_b))
                         } if self.up_w[0].numel() >= self.PER_HEAD_ELEMENTS else None

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, cache: KVCache, first_layer: int, at: torch.Tensor) -> torch.Tensor:
        """Trunk states h (B, T, D) of the T fed positions (after the cache's lengths) -> the heads'
        normalised states (m, B, D) at positions `at` (B,) of these T; writes their keys and values."""
        qkv = self.project(h)  # (B, T, m, 3, H, hd)
        k, v = qkv[:, :, :, 1].permute(2, 0, 3, 1, 4), qkv[:, :, :, 2].permute(2, 0, 3, 1, 4)  # (m, B, H, T, hd)
        keys, values = cache.update_layers(first_layer, k, v)  # (m, B, H, S, hd)
        ends = torch.tensor(cache.lengths, device=h.device) + at  # (B,): each query's absolute position
        return self.finish(h, qkv, keys, values, ends, at)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Every head's q, k, v at all T fed positions: (B, T, D) -> (B, T, m, 3, H, hd), one linear."""
        B, T, D = h.shape
        return packed.linear(self, F.layer_norm(h, (D,), eps=self.eps), self.qkv_w, self.qkv_b).view(B, T, self.m, 3, self.n_heads, self.head_dim)

    def finish(self, h: torch.Tensor, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ends: torch.Tensor,
               at: torch.Tensor) -> torch.Tensor:
        """The heads' states (m, B, D) at positions `at` (B,) of the T fed ones: attention of their queries over
        keys / values (m, B, H, S, hd) up to absolute position `ends` (B,), then output projection, MLP, norm."""
        B, T, D = h.shape
        m, H, hd = self.m, self.n_heads, self.head_dim
        S = keys.shape[3]
        flat = torch.arange(B, device=h.device) * T + at  # (B,) rows of the flattened (B*T) positions
        q = qkv.view(B * T, m, 3, H, hd).index_select(0, flat)[:, :, 0].transpose(0, 1).reshape(m * B, H, 1, hd)
        keys_ok = torch.arange(S, device=h.device) <= ends[:, None]  # (B, S): keys up to the query
        mask = torch.where(keys_ok, 0.0, float("-inf")).to(h.dtype)  # additive, as SDPA would make it
        mask = mask[None, :, None, None].expand(m, B, 1, 1, S).reshape(m * B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, keys.reshape(m * B, H, S, hd), values.reshape(m * B, H, S, hd),
                                           attn_mask=mask)  # (m*B, H, 1, hd)
        x = self._linears("out", y.reshape(m, B, D), self.out_b, self.out_w) + h.reshape(B * T, D).index_select(0, flat)  # (m, B, D)
        u = F.gelu(self._linears("up", F.layer_norm(x, (D,), eps=self.eps), self.up_b, self.up_w), approximate=self.approximate)
        x = x + self._linears("down", u, self.down_b, self.down_w)
        return torch.addcmul(self.norm_b, F.layer_norm(x, (D,), eps=self.eps), self.norm_w)  # each head's final norm

    def _linears(self, name: str, x: torch.Tensor, bias: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """Head k's linear `name` on x[k]: (m, B, in) -> (m, B, out), as one batched matmul, or as m packed
        linears in bf16 on a CPU (model/packed.py)."""
        if self.per_head is not None and packed.applies(x, weight_t):
            return torch.stack([packed.linear(self, x[k], w, b) for k, (w, b) in enumerate(self.per_head[name])])
        return torch.baddbmm(bias, x, weight_t)
