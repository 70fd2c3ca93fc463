"""Where a command runs: `--device` of `generate`, `eval` and `precompute-features`, and `--dtype` of decoding.

    device = pick_device("auto")   # the first CUDA GPU when torch sees one, else the CPU
    dtype, note = decode_dtype("bf16", device)

torch is imported inside pick_device: the CLI reads CHOICES for its --help without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHOICES = "auto (the first GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A --device that torch cannot use here, or a --dtype that is not one of DTYPE_CHOICES."""


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA GPU when torch sees one, else the CPU; "cpu", "cuda" or "cuda:N" as given, after
    checking that torch can use it (a clear error, not a crash inside the first kernel)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(f"--device {name}: torch sees {count} CUDA GPU(s) (torch {torch.__version__}, CUDA "
                              f"build {torch.version.cuda}); use --device cpu or auto")
    return device


DTYPE_CHOICES = ("fp32", "bf16")


def decode_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """--dtype of `generate` and `eval` -> (the dtype to decode in, a note or None). fp32, the default, decodes
    every export (its weights stored in fp32 or bf16) the same way on every machine; "bf16" where the
    hardware has no native bf16 runs, slowly, with a note that says so."""
    import torch

    if name not in DTYPE_CHOICES:
        raise DeviceError(f"--dtype {name!r}: use {' or '.join(DTYPE_CHOICES)}")
    if name == "fp32":
        return torch.float32, None
    from vlm_dist.train.dsconfig import cpu_flags, hardware_precision

    cuda = device.type == "cuda"
    native, why = hardware_precision(cuda, cuda and torch.cuda.is_bf16_supported(), None if cuda else cpu_flags())
    return torch.bfloat16, (None if native == "bf16" else f"note: --dtype bf16 here: {why}")
