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
    return dw.addmm_(p.T.float(), xc.float())  # p fp32 (no copy), or the fused path's low-precision p


def chunk_forward(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's matmul output (C, V) -> (cross-entropy, logsumexp) per row, fp32: the eager path's ops."""
    logits = logits.float()
    return F.cross_entropy(logits, y, reduction="none"), logits.logsumexp(dim=-1)


def chunk_backward(logits: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, grad: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """(softmax - onehot) * grad per row, in `dtype`: the eager path's in-place steps, written as one expression."""
    onehot = torch.arange(logits.shape[1], device=logits.device) == y[:, None]
    return ((logits.float() - lse[:, None]).exp() - onehot.float()).mul(grad[:, None]).to(dtype)


class _Kernels:
    """chunk_forward and chunk_backward compiled (inductor), rows dynamic: each becomes one or two fused
    kernels that read the (C, V) matmul output once or twice, where eager runs ~8 kernels over fp32 copies
    of it (a quarter of an H100 base step: docs/bench/gpu_round5.md). Made on first use (model.compile)."""

    def __init__(self) -> None:  # dynamic=False: only the rows marked below vary, V stays a constant
        self._forward = torch.compile(chunk_forward, dynamic=False)
        self._backward = torch.compile(chunk_backward, dynamic=False)

    def forward(self, logits, y):
        torch._dynamo.mark_dynamic(logits, 0)
        torch._dynamo.mark_dynamic(y, 0)
        return self._forward(logits, y)

    def backward(self, logits, lse, y, grad, dtype):
        for t in (logits, lse, y, grad):
            torch._dynamo.mark_dynamic(t, 0)
        return self._backward(logits, lse, y, grad, dtype)


_KERNELS: _Kernels | None = None


def kernels() -> _Kernels:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _Kernels()
    return _KERNELS


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rows: int, fused: bool = False) -> torch.Tensor:
        N = x.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=x.device)
        lse = torch.empty(N, dtype=torch.float32, device=x.device)
        keep = N * weight.shape[0] <= KEEP_ELEMENTS
        ctx.kept = []  # each chunk's logits when small (KEEP_ELEMENTS), for backward to use once
        for i in range(0, N, rows):
            logits = x[i : i + rows] @ weight.T  # (C, V): the only vocabulary-sized tensor
            if fused:  # one compiled kernel reads the matmul's output, writes 2 floats per row
                ce[i : i + rows], lse[i : i + rows] = kernels().forward(logits, y[i : i + rows])
            else:
                logits = logits.float()
                ce[i : i + rows] = F.cross_entropy(logits, y[i : i + rows], reduction="none")  # as unchunked
                lse[i : i + rows] = logits.logsumexp(dim=-1)
            if keep:
                ctx.kept.append(logits)
        ctx.save_for_backward(x, weight, y, lse)
        ctx.rows, ctx.fused = rows, fused
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
                logits = xc @ weight.T
            if ctx.fused:  # one compiled kernel: matmul output in, dCE/dlogits * grad out in the weights' dtype
                p = kernels().backward(logits, lse[i : i + rows], y[i : i + rows], grad[i : i + rows], weight.dtype)
                p_low = p if weight.dtype != torch.float32 else None
            else:
                p = logits.float().sub_(lse[i : i + rows, None]).exp_()  # softmax (C, V), in place
                p[torch.arange(xc.shape[0], device=p.device), y[i : i + rows]] -= 1.0
                p.mul_(grad[i : i + rows, None])  # dCE/dlogits for each row, scaled by the incoming gradient
                p_low = p.to(weight.dtype) if weight.dtype != torch.float32 else None
            if want_x:
                dx[i : i + rows] = (p if p_low is None else p_low) @ weight
            if want_w:
                dw = accumulate_dw(dw, p, p_low, xc)  # (V, C) @ (C, D), accumulated
        return dx, (dw.to(weight.dtype) if want_w else None), None, None, None


class Unembedding(nn.Linear):
    """nn.Linear(d_model, vocab, bias=False) that also scores targets: forward(x, targets) -> (N,) CE."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.fused = False  # True: the compiled chunk kernels (VLM.compile_regions / model.compile)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)
        rows = chunk_rows(x.device, self.weight.shape[0])
        if not torch.is_grad_enabled():  # evaluation: chunked too, nothing saved
            return torch.cat([F.cross_entropy(F.linear(x[i : i + rows], self.weight).float(), targets[i : i + rows],
                                              reduction="none") for i in range(0, x.shape[0], rows)]
                             or [x.new_zeros(0, dtype=torch.float32)])
        return LinearCrossEntropy.apply(x, self.weight, targets, rows, self.fused)
