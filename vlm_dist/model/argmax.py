"""Exact greedy argmax over the full vocabulary from a shortlist's logits and a certificate.

    table = CertifiedArgmax(model.lm_head.weight)        # built once from the weights alone (0.3 s)
    ids = table(x)                                       # x (N, D) -> argmax_v (x @ W^T)[:, v], (N,)

At the demo's width (D = 128, V = 49,408) the full (V, D) unembedding costs more than the whole 4-block
trunk of a decoding step (docs/bench/issue9.md). But a trained model's rows are not alike: the rows of
tokens the training data never used all drift the same way (the softmax gradient pushes them away from
the mean hidden state, Adam makes every such step lr-sized), so they sit in a small ball around one
centre c: on the demo export, 49,373 rows lie within 0.29 of c while the 35 tokens the demo uses lie
1.6 - 2.4 away. Write an outside row as w_j = c + r_j with ||r_j|| <= R. By Cauchy-Schwarz,

    x . w_j  =  x . c + x . r_j  <=  x . c + R ||x||      for every row j outside the shortlist S,

so when the best shortlist logit beats x . c + R ||x|| (+ a rounding allowance), the shortlist's argmax
IS the full vocabulary's argmax. One (K+1, D) matmul gives the shortlist's logits and x . c together;
rows whose certificate fails (an untrained model, an unusual input) fall back to the full matmul, so the
result is exact for every input. The shortlist and the ball come from the weights alone (never from
evaluation data): S = the K rows farthest from the rows' coordinate-wise median.

Rounding: the full matmul's computed logits differ from the exact ones by at most ~D u ||w|| ||x||
(fp32 accumulation, u the unit roundoff; bf16 outputs add their own rounding of 2^-8 |logit|). The
allowance `tol` = (8 D 2^-24 + 4 u_out) max_j ||w_j|| ||x|| covers the full matmul's error, the
shortlist kernel's and the bound's own, so a certified row's answer is the one the full matmul would
give, up to ties within the rounding of the shortlist's own top logits (the same caveat as any two
matmul kernels; the tests check exact equality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SHORTLIST = 256  # rows; below this the shortlist matmul is all overhead anyway
TINY_NORM = 1e-15  # a state of smaller norm is not certified: its fp32 norm may have underflowed (squares < 1e-30)


def unembed_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax_v (x @ weight.T)[:, v] for x (N, D), weight (V, D): ids (N,), without keeping the logits.

    The kernel depends on N, measured on the 2-core EPYC CPU (1 thread, V = 49,408, D = 128;
    docs/bench/issue9.md): up to 8 rows, W @ X^T (V, N) with X row-major is the fast layout (1.0 ms for
    2 rows, 1.3 ms for 4, where x @ W^T costs 2.6 ms for 1 row and 9.3 ms for 3; a one-column W @ x and
    W @ X^T with X^T made contiguous hit slow kernels, so one row is fed twice); beyond 8 rows the
    argmax along the (V, N) result's outer dimension costs more than the matmul's layout saves, and
    x @ W^T (N, V) with a contiguous argmax wins (15 vs 22 ms at 32 rows).
    """
    x = x.to(weight.dtype).contiguous()
    N = x.shape[0]
    if N > 8:
        return F.linear(x, weight).argmax(dim=-1)
    if N == 1:
        x = x.repeat(2, 1)
    return (weight @ x.T).argmax(dim=0)[:N]


def shortlist_size(dist: torch.Tensor) -> int:
    """Rows to shortlist from each row's distance to the centre: the outliers (farther than twice the
    median distance: the tokens training moved), rounded up to a multiple of 64, at least MIN_SHORTLIST."""
    outliers = int((dist > 2 * dist.median()).sum())
    return min(dist.shape[0], max(MIN_SHORTLIST, -(-outliers // 64) * 64))


class CertifiedArgmax:
    """argmax over the full vocabulary of x @ weight^T, computed on a shortlist and certified (module doc).

    Counts `rows` answered and `fallback_rows` that needed the full matmul (for reports)."""

    def __init__(self, weight: torch.Tensor, size: int | None = None, ids: torch.Tensor | None = None) -> None:
        """weight (V, D): the unembedding. The shortlist: `ids` if given (any ids: the certificate keeps
        the result exact), else the `size` (default `shortlist_size`) rows farthest from the median row."""
        W = weight.detach()
        V, D = W.shape
        Wf = W.float()
        if ids is None:
            dist = (Wf - Wf.median(dim=0).values).norm(dim=1)  # (V,)
            ids = dist.topk(min(V, shortlist_size(dist) if size is None else max(size, 0))).indices
        ids = ids.to(W.device).unique()  # sorted: ties break towards the lower id, as in a full argmax
        K = ids.numel()
        if K == 0:
            raise ValueError("CertifiedArgmax needs a non-empty shortlist: pass size >= 1 or some ids "
                             "(or None: the default)")
        outside = torch.ones(V, dtype=torch.bool, device=W.device)
        outside[ids] = False
        self.weight, self.ids, self.size = W, ids, K
        if outside.any():
            # the centre as stored in the table (bf16-rounded in a bf16 model), the radius measured from it
            centre = Wf[outside].mean(dim=0).to(W.dtype)  # (D,)
            radius = (Wf[outside] - centre.float()).norm(dim=1).max().item() * (1 + 1e-5)
        else:  # the shortlist is the vocabulary: nothing to bound
            centre, radius = torch.zeros(D, dtype=W.dtype, device=W.device), float("-inf")
        # one matmul gives the shortlist's logits (columns :K) and x . centre (column K)
        self.table = torch.cat([W[ids], centre[None]]).contiguous()  # (K+1, D)
        self.radius = radius
        u_out = torch.finfo(W.dtype).eps / 2  # the logits' own rounding (fp32 2^-24, bf16 2^-8)
        # ||centre|| <= max ||w_j|| (a mean of rows), so one allowance covers every computed term
        self.slack = radius + (8 * D * 2.0**-24 + 4 * u_out) * Wf.norm(dim=1).max().item()  # times ||x||
        self.rows = self.fallback_rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N,) ids: the full vocabulary's argmax of x @ W^T for every row. Autocast is off
        inside: the rounding allowance is the table dtype's, and a bf16 matmul under autocast would
        round the logits (and inputs) far more than it allows (tests/test_argmax.py)."""
        if not torch.is_autocast_enabled(x.device.type):  # (the check costs 0.2 us, the context 2.6 us)
            return self._argmax(x)
        with torch.autocast(x.device.type, enabled=False):
            return self._argmax(x)

    def bound(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) in the table's dtype and its shortlist matmul s = F.linear(x, self.table) (N, K+1) -> a bound
        (N,), in fp32, on every outside token's logit as the full matmul computes it, and the rows it holds for
        (N,) (the certified argmax and shortlist sampling, infer/shortlist_sampling.py, both rest on it)."""
        # x . w_j <= x . centre + radius ||x|| for every row j outside the shortlist (+ rounding); in fp32
        norm = (x if x.dtype == torch.float32 else x.float()).norm(dim=1)
        # below ~1e-19 per entry the squares underflow and the norm with them (to 0 at ~1e-23), while the
        # logits are still ordinary numbers: such rows (never a layer norm's output) take the full matmul
        return torch.add(s[:, -1], norm, alpha=self.slack), norm > TINY_NORM

    def _argmax(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        s = F.linear(x, self.table)  # (N, K+1)
        best, arg = s[:, :-1].max(dim=1)
        out = self.ids[arg]
        self.rows += x.shape[0]
        if self.radius == float("-inf"):
            return out
        bound, holds = self.bound(x, s)
        certified = (best > bound) & holds  # bf16 logits meet an fp32 bound
        if not bool(certified.all()):
            bad = (~certified).nonzero().squeeze(1)
            out[bad] = unembed_argmax(x[bad], self.weight)
            self.fallback_rows += bad.numel()
        return out
