"""bf16 linear layers of CPU decoding through weights packed once for oneDNN.

    y = packed.linear(block, x, lin.weight, lin.bias)   # = F.linear(x, lin.weight, lin.bias)

On a CPU, F.linear in bf16 goes to oneDNN, which reorders (packs) the weight into its blocked layout on
every call: at the `base` width (768) that reorder is as much memory traffic as the matmul of a decoding
step itself. Packing each weight once (torch.ops.mkldnn._reorder_linear_weight, the packing that
inductor's CPU freezing pass emits) and multiplying with the packed copy (torch.ops.mkldnn._linear_pointwise)
gives the same numbers (the same oneDNN kernel, tested equal) at about half the time: on the 2-core AMD
EPYC (Zen 5, avx512_bf16), 1 thread, a (2304 x 768) bf16 linear took 106 -> 58 us for 1 row, and a base-width
greedy step 26.6 -> 15.3 ms (docs/bench/issue9_round10.md). fp32 goes to MKL, where packing saved nothing, and
GPUs never come here: both keep F.linear.

The packed copies live on the module that owns the weights (`owner`), each checked against the weight itself
(a weak reference) and its stamp (model/stamps.py: data_ptr, version) and shape; a write through `.data` (DeepSpeed's ZeRO optimizer)
changes none of these, so VLM.drop_decode_caches drops them (`drop`), as it drops the argmax table. They cost
one more copy of the decoder's bf16 weights while they live, and deep copies and pickles of the model leave
them out (oneDNN's packed tensors can be neither copied nor saved). torch.ops.mkldnn's ops are not public
API: where they are missing, or the CPU lacks oneDNN's bf16 kernels (an AVX2-only CPU), F.linear serves
(`AVAILABLE`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from vlm_dist.model.stamps import stamp

ATTR = "_packed_linears"
# the two ops, and oneDNN's bf16 kernels on this CPU (avx512bw/vl/dq or avx_ne_convert: an AVX2-only CPU has
# none, and the packing op raises there)
AVAILABLE = (torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in (
    "_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"))
    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
enabled = True  # benchmarks switch it off to measure F.linear side by side (tools/bench_decode.py)


class _Copies(dict):
    """id(weight) -> (weak reference to it, (stamp, shape), packed copy). Deep-copies and pickles
    as empty: oneDNN's packed tensors can be neither copied nor saved (copy.deepcopy / torch.save of a model
    that decoded in bf16 would raise), and a copy's weights are other tensors anyway."""

    def __reduce__(self):  # copy.deepcopy and pickle (torch.save) both go through it
        return _Copies, ()


def linear(owner: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias); a bf16 CPU call without autograd multiplies by a packed copy of `weight`
    kept on `owner` (made on first use, remade when the weight's storage, version or shape changes)."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    cache = owner.__dict__.get(ATTR)
    if cache is None:
        cache = owner.__dict__[ATTR] = _Copies()
    key = (*stamp(weight), weight.shape)
    entry = cache.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key:
        for dead in [i for i, e in cache.items() if e[0]() is None]:  # weights replaced since: free their copies
            del cache[dead]
        entry = cache[id(weight)] = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), entry[2], bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` multiplies x by a packed copy of weight: bf16 both, on a CPU with oneDNN's bf16
    kernels, outside autograd."""
    return (enabled and AVAILABLE and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.is_grad_enabled())


def drop(module: nn.Module) -> None:
    """Forget the packed copies held by `module` and its submodules."""
    for m in module.modules():
        m.__dict__.pop(ATTR, None)
