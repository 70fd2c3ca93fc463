"""Peak memory and time of the heads' training loss: all heads' logits at once (before issue 9) vs the
model's chunked linear + cross-entropy (`VLM.head_loss`, model/loss.py).

    python tools/bench_head_loss.py                      # base width (24 x 768, n_future 4), micro-batch 16
    python tools/bench_head_loss.py --preset demo --batch 16 --dtype bf16 --n-future 4
    python tools/bench_head_loss.py --preset demo --batch 16 --step     # the whole training step's time

What is measured: the loss computation alone (extra head blocks + norms + unembedding + cross-entropy,
forward and backward), from a fixed trunk output h (B, P+T, D) that requires grad, so the trunk's own
activations do not blur the comparison. Targets: random captions of 8 .. data.max_text_len tokens
(padding and IGNORE_INDEX as in real batches), n_future heads. Each variant runs in a fresh subprocess
with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the
resident set and RSS follows live memory (as tools/bench_model.py does). After one warm-up iteration
(gradients allocated and kept), peak = VmHWM during forward + backward minus VmRSS just before it
(VmHWM reset by `echo 5 > /proc/self/clear_refs`). Time: median of --repeats iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def plain_head_loss(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as computed before issue 9: every head's state, then every head's (N, V) logits, kept
    for backward together."""
    from vlm_dist.text import IGNORE_INDEX

    P = model.n_image_tokens
    per_sample = []
    for k, s in enumerate(model.head_states(h)):
        t = targets[:, k]
        valid = t != IGNORE_INDEX
        ce = F.cross_entropy(model.lm_head(s[:, P:][valid]).float(), t[valid], reduction="none")
        rows = valid.nonzero(as_tuple=True)[0]
        per_sample.append(torch.zeros(t.shape[0], dtype=ce.dtype).index_add(0, rows, ce) / valid.sum(1).clamp(min=1))
    weights = torch.tensor(model.cfg.head_weights)
    return (weights * torch.stack(per_sample, 1).mean(0)).sum()


def kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, preset: str, batch: int, dtype: str, repeats: int, n_future: int, step: bool = False) -> dict:
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM
    from vlm_dist.text import IGNORE_INDEX, make_targets

    torch.set_num_threads(1)
    cfg = load_config(preset, ["model.vision.model_name=vlm-tiny-vit", "model.vision.pretrained=null", f"model.n_future={n_future}"])
    torch.manual_seed(0)
    model = VLM(cfg.model).to(torch.bfloat16 if dtype == "bf16" else torch.float32).train()
    L = cfg.data.max_text_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49406, (batch, L), generator=g)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    for b, n in enumerate(torch.randint(8, L + 1, (batch,), generator=g).tolist()):
        mask[b, 1:n] = True
    _, targets = make_targets(tokens, mask, cfg.model.n_future)
    h = torch.randn(batch, model.n_image_tokens + L - 1, cfg.model.d_model, generator=g).to(model.lm_head.weight.dtype)
    h.requires_grad_(True)
    if not step:  # the loss computation alone, from the fixed trunk output h
        loss_fn = (lambda: model.head_loss(h, targets)["loss"]) if variant == "chunked" else (lambda: plain_head_loss(model, h, targets))

        def after():
            pass
    else:  # the whole training step: vision tower, trunk, heads' loss, backward, AdamW update
        if variant == "plain":
            model.head_loss = lambda h, t: {"loss": plain_head_loss(model, h, t)}  # what VLM.forward calls
        size = cfg.model.vision.geometry["image_size"]
        images = torch.randn(batch, 3, size, size, generator=g).to(model.lm_head.weight.dtype)
        inputs, targets = make_targets(tokens, mask, cfg.model.n_future)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def loss_fn():
            opt.zero_grad(set_to_none=False)
            return model(images, inputs, targets)["loss"]

        def after():
            opt.step()
    loss_fn().backward()  # warm-up: gradients allocated, kept from here on
    after()
    peaks, times = [], []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")
        before = kib("VmRSS")
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        after()
        times.append(time.perf_counter() - t)
        peaks.append(kib("VmHWM") - before)
        del loss
    valid = int((targets != IGNORE_INDEX).sum())
    return {"variant": variant, "peak_mib": max(peaks) / 1024, "seconds": statistics.median(times),
            "valid_targets": valid, "logits_mib_per_head_fp32": valid / cfg.model.n_future * model.vocab_size * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-future", type=int, default=4)
    p.add_argument("--step", action="store_true",
                   help="time the whole training step (random images and captions, forward + backward + AdamW), not the loss alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.batch, args.dtype, args.repeats, args.n_future, args.step)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--batch", str(args.batch),
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--n-future", str(args.n_future)] + ["--step"] * args.step
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    a, b = res["plain"], res["chunked"]
    print(f"{args.preset}, n_future {args.n_future}, micro-batch {args.batch}, {args.dtype}, {a['valid_targets']} valid targets over all heads, "
          f"load average {os.getloadavg()[0]:.1f}\n"
          f"| {'training step (forward + backward + AdamW)' if args.step else 'loss computation'}, heads' loss as | "
          "peak MiB (fwd+bwd) | seconds (median) |\n|---|---|---|\n"
          f"| all heads' logits at once (before) | {a['peak_mib']:.0f} | {a['seconds']:.2f} |\n"
          f"| one chunked linear + cross-entropy (VLM.head_loss) | {b['peak_mib']:.0f} | {b['seconds']:.2f} |\n"
          f"| ratio new / old | {b['peak_mib'] / a['peak_mib']:.3f} | {b['seconds'] / a['seconds']:.2f} |")


if __name__ == "__main__":
    main()
