"""Analytic training FLOPs of the VLM, the device's peak rate (for MFU), and memory in use.

    flops = train_flops(cfg.model, vocab_size, batch=B, text_len=T, n_targets=N)  # one micro-batch
    peak = peak_flops(torch.device("cuda", 0))   # None on the CPU and on unknown GPUs: no MFU then
    mem = memory_metrics(device)                 # {"mem_peak_gib": ...} or {"mem_rss_gib", "mem_peak_rss_gib"}

Counting rules (model FLOPs, as in PaLM's MFU: one multiply-add = 2 FLOPs; activation-checkpointing
recompute is *not* counted, so MFU < hardware utilisation when it is on):

- a matmul of an (M, K) by a (K, N) matrix costs 2·M·K·N; layer norms, activations, softmax, the
  embedding lookup and the optimizer are ignored (they are O(tokens·width), not O(tokens·width²));
- attention scores and the weighted sum cost 2·2·S²·d per layer over a sequence of S tokens (the full
  S×S product, as PaLM and nanoGPT count it, although the causal half is masked);
- backward costs twice the forward of every trained module (grad w.r.t. inputs and w.r.t. weights),
  except where no input gradient is needed: the patch-embedding convolution (its input is the image)
  and, above a frozen vision tower, the projector (backward = 1× their forward); a frozen tower runs
  forward only (no graph);
- the LM head (D -> V) runs only on target positions (see VLM._sample_losses): 2·D·V per valid target
  of each head, not per position.

Per sample, with P image tokens, T text positions, S = P + T, D = d_model, H = int(mlp_ratio·D),
L = n_layers + n_future − 1 blocks (trunk + one block per extra head), vision width W, vision MLP
width H_v, L_v vision layers, P patches of size p, N_v = P + 1 tokens (class token):

    patch     = 2·P·(3p²)·W                                  (the patch-embedding convolution)
    vision    = L_v·[2·N_v·(4W² + 2·W·H_v) + 4·N_v²·W]
    projector = 2·P·W·D
    blocks    = L·[2·S·(4D² + 2·D·H) + 4·S²·D]
    lm_head   = 2·D·V·(valid targets of all heads)          (per micro-batch, not per sample)
    train     = 3·(blocks + lm_head) + [2·patch + 3·vision + 3·projector   if the tower trains
                                        patch + vision + 2·projector      if it is frozen]

tests/test_observe.py checks this against torch.utils.flop_counter.FlopCounterMode on the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_dist.config import ModelConfig

# Dense bf16 peak FLOP/s by device-name substring (first match wins: a name that contains another comes first,
# "H100 NVL" before "H100", "L40S" and "L40" before "L4"), from NVIDIA's datasheets (their sparsity figures halved).
PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
]


def vision_flops(cfg: ModelConfig) -> tuple[float, float]:
    """Forward FLOPs of the vision tower for one image (open_clip ViT: class token + patches):
    (patch-embedding convolution, transformer layers)."""
    import open_clip

    geo = cfg.vision.geometry  # registers this package's towers too
    v = open_clip.get_model_config(cfg.vision.model_name)["vision_cfg"]
    W, L, p = geo["width"], v["layers"], geo["patch_size"]
    H = int(v.get("mlp_ratio", 4.0) * W)
    P = geo["n_tokens"]
    N = P + 1
    return 2 * P * 3 * p * p * W, L * (2 * N * (4 * W * W + 2 * W * H) + 4 * N * N * W)


def forward_flops(cfg: ModelConfig, vocab_size: int, batch: int, text_len: int, n_targets: int) -> dict[str, float]:
    """Forward FLOPs of one micro-batch, by part: images (batch,), text positions `text_len`, and
    `n_targets` valid target tokens summed over all heads."""
    D, P = cfg.d_model, cfg.n_image_tokens
    S, H = P + text_len, int(cfg.mlp_ratio * D)
    L = cfg.n_layers + cfg.n_future - 1
    patch, vision = vision_flops(cfg)
    return {
        "patch": batch * patch,
        "vision": batch * vision,
        "projector": batch * 2 * P * cfg.vision.geometry["width"] * D,
        "blocks": batch * L * (2 * S * (4 * D * D + 2 * D * H) + 4 * S * S * D),
        "lm_head": 2 * D * vocab_size * n_targets,
    }


def train_flops(cfg: ModelConfig, vocab_size: int, batch: int, text_len: int, n_targets: int,
                tower: bool = True) -> float:
    """Forward + backward FLOPs of one training micro-batch (module docstring: what counts). tower=False:
    the batch holds precomputed features of the frozen tower (data/features.py), which then never runs."""
    f = forward_flops(cfg, vocab_size, batch, text_len, n_targets)
    trained = 3 * (f["blocks"] + f["lm_head"])
    if cfg.vision.freeze:
        return trained + (f["patch"] + f["vision"] if tower else 0) + 2 * f["projector"]
    return trained + 2 * f["patch"] + 3 * (f["vision"] + f["projector"])


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (CPU, unknown accelerator): MFU is then omitted."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def proc_status_kib(field: str) -> float | None:
    """A /proc/self/status field in KiB (VmRSS, VmHWM, ...), or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """GPU: peak allocated bytes since the previous call (the peak counter is reset), in GiB.
    CPU: this process's resident set now and its lifetime peak (VmHWM), in GiB (Linux /proc)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"mem_peak_gib": peak / 2**30}
    out = {}
    for key, field in (("mem_rss_gib", "VmRSS"), ("mem_peak_rss_gib", "VmHWM")):
        kib = proc_status_kib(field)
        if kib is not None:
            out[key] = kib / 2**20
    return out


def throughput_metrics(step_flops: float, seconds: float, world_size: int, peak: float | None) -> dict[str, float]:
    """Achieved TFLOP/s per device from the step's FLOPs summed over all ranks, and MFU against the
    device's bf16 peak when it is known (never on the CPU)."""
    per_device = step_flops / world_size / seconds
    out = {"tflops_per_device": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out
