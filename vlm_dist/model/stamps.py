"""What the decode caches key on: which memory a weight lives in, and how many in-place writes it has had.

    key = stamps(model.extra_heads.parameters())   # a tuple; compare with the one the cache was built from

The argmax table (VLM.argmax_table), the stacked draft heads (VLM.fused_heads), the static decoding
sessions (infer/static.py) and the packed bf16 weights (model/packed.py) are derived from the weights once and
rebuilt when this stamp changes: a load, .to() or an optimizer step of plain PyTorch's foreach AdamW changes a
weight's storage or bumps its version counter. A write through `.data` (DeepSpeed's ZeRO) or torch's fused
AdamW kernel bumps neither (VLM.drop_decode_caches is for those), nor does an in-place write to a tensor made
under torch.inference_mode(): such a tensor has no version counter at all (reading `_version` raises), so its
stamp counts 0 writes, and a write to it, possible only inside inference mode, needs drop_decode_caches too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def stamp(t: torch.Tensor) -> tuple[int, int]:
    """(data_ptr, version): the version is 0 for an inference tensor, which has no version counter."""
    return t.data_ptr(), 0 if t.is_inference() else t._version


def stamps(tensors: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple(stamp(t) for t in tensors)
