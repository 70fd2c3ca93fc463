"""A chunked linear + cross-entropy for the vocabulary-sized heads: ce = CE(x @ W^T, y) per row without
ever holding the (rows, V) logits, and with ONE (V, D) weight gradient for all heads.

    unembed = Unembedding(d_model, vocab_size)           # an nn.Linear: same weight, same state dict
    logits = unembed(x)                                  # (..., V), as nn.Linear
    ce = unembed(x, targets)                             # (N,) fp32 cross-entropy of each row of x (N, D)

Forward computes the logits of CHUNK_ELEMENTS // V rows at a time (CUDA_CHUNK_ELEMENTS on a GPU) and
keeps only each row's logsumexp (and the logits themselves while they are small: KEEP_ELEMENTS); backward
recomputes each chunk's logits, turns them into (softmax - onehot) * grad in place, and accumulates dW
into one fp32 buffer (accumulate_dw). Autograd's own version keeps every row's fp32
log-probabilities for backward and makes one (V, D) gradient per use of W; the model calls this once
for all heads' rows (tools/bench_head_loss.py measures the peak). The gradient is the same function
of the inputs (tests/test_heads_loss.py checks 1e-6 in fp32, and under ZeRO-2/3); calling it through
the module keeps DeepSpeed ZeRO-3's parameter gathering hooks in play.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Logit elements (rows x vocabulary) alive at once: 2^22 fp32 = 16 MiB, about 85 rows of a
# 49,408-token vocabulary: small next to the (V, D) gradient, large enough for an efficient matmul
# on a CPU. A GPU needs far larger matmuls to be efficient: 85-row chunks made ~1700 small GEMMs per
# base step on an H100 (docs/bench/gpu_round5.md); 2^26 fp32 = 256 MiB there, ~1360 rows.
CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 26
# Logits of at most this many elements in all (2^24 fp32 = 64 MiB) are kept from forward for backward
# instead of recomputed: a CPU demo step (~150 rows) then makes 3 vocabulary-sized GEMMs, not 4 (14 % of an
# fp32 forward + backward on one process, 1-6 % of the 2-rank demo step: docs/bench/issue10_round6.md).
# Bit for bit the same gradients: the recompute is the same GEMM on the same chunk. A realistic GPU
# micro-batch is far above it and recomputes, as before.
KEEP_ELEMENTS = 1 << 24


def chunk_rows(device: torch.device, vocab: int) -> int:
    return max(1, (CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS) // vocab)


def accumulate_dw(dw: torch.Tensor, p: torch.Tensor, p_low: torch.Tensor | None, xc: torch.Tensor) -> torch.Tensor:
    """dw (fp32) += p^T @ xc. fp32 weights: one fp32 GEMM, exact as ever. bf16/fp16 weights on CUDA: the
    GEMM reads the low-precision operands (p_low = p rounded to the weights' dtype, as autograd's own
    nn.Linear backward would) and accumulates in fp32 (addmm's out_dtype), on the tensor cores: the fp32
    GEMM was a quarter of an H100 base step. CPU: no out_dtype kernel there, so fp32 as before."""
    if p_low is not None and xc.is_cuda:
        return torch.addmm(dw, p_low.T, xc, out_dtype=torch.float32)
    return dw.addmm_(p.T, xc.float())


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        N = x.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=x.device)
        lse = torch.empty(N, dtype=torch.float32, device=x.device)
        keep = N * weight.shape[0] <= KEEP_ELEMENTS
        ctx.kept = []  # each chunk's logits when small (KEEP_ELEMENTS), for backward to use once
        for i in range(0, N, rows):
            logits = (x[i : i + rows] @ weight.T).float()  # (C, V): the only vocabulary-sized tensor
            ce[i : i + rows] = F.cross_entropy(logits, y[i : i + rows], reduction="none")  # as unchunked
            lse[i : i + rows] = logits.logsumexp(dim=-1)
            if keep:
                ctx.kept.append(logits)
        ctx.save_for_backward(x, weight, y, lse)
        ctx.rows = rows
        return ce

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, y, lse = ctx.saved_tensors
        rows = ctx.rows
        want_x, want_w = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if want_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        kept, ctx.kept = ctx.kept, []  # used up in place: a second backward (retain_graph) recomputes
        for c, i in enumerate(range(0, x.shape[0], rows)):
            xc = x[i : i + rows]
            if kept:
                logits, kept[c] = kept[c], None  # freed as the loop goes on
            else:
                logits = (xc @ weight.T).float()
            p = logits.sub_(lse[i : i + rows, None]).exp_()  # softmax (C, V), in place
            p[torch.arange(xc.shape[0], device=p.device), y[i : i + rows]] -= 1.0
            p.mul_(grad[i : i + rows, None])  # dCE/dlogits for each row, scaled by the incoming gradient
            p_low = p.to(weight.dtype) if weight.dtype != torch.float32 else None
            if want_x:
                dx[i : i + rows] = (p if p_low is None else p_low) @ weight
            if want_w:
                dw = accumulate_dw(dw, p, p_low, xc)  # (V, C) @ (C, D), accumulated
        return dx, (dw.to(weight.dtype) if want_w else None), None, None


class Unembedding(nn.Linear):
    """nn.Linear(d_model, vocab, bias=False) that also scores targets: forward(x, targets) -> (N,) CE."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)
        rows = chunk_rows(x.device, self.weight.shape[0])
        if not torch.is_grad_enabled():  # evaluation: chunked too, nothing saved
            return torch.cat([F.cross_entropy(F.linear(x[i : i + rows], self.weight).float(), targets[i : i + rows],
                                              reduction="none") for i in range(0, x.shape[0], rows)]
                             or [x.new_zeros(0, dtype=torch.float32)])
        return LinearCrossEntropy.apply(x, self.weight, targets, rows)
