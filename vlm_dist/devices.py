"""Where a command runs: `--device` of `generate`, `eval` and `precompute-features`.

    device = pick_device("auto")   # the first CUDA GPU when torch sees one, else the CPU

torch is imported inside pick_device: the CLI reads CHOICES for its --help without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHOICES = "auto (the first GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A --device that torch cannot use here."""


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
