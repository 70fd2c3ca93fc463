"""Can a vision tower see the demo's attributes? Train an open_clip tower + a linear readout (per position:
kind / colour / size) on freshly rendered demo images, in plain PyTorch, and print held-out accuracy.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/probe_vision.py --tower vlm-tiny-vit --steps 200
    HF_HUB_OFFLINE=1 .venv/bin/python tools/probe_vision.py --from-export runs/demo/export --freeze --steps 300

This is the diagnostic behind docs/bench/issue10.md: it separates "the tower cannot see it" from "the
VLM does not learn to read it". With --from-export DIR --freeze, the tower a VLM training left behind is
probed as it is (only the readout learns): does that tower still encode what its decoder fails to read? Compare
with `--freeze` alone (a frozen random tower). Images go through the trainer's own pipeline (JPEG -> ImageToTensor).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from vlm_dist.config import VisionConfig, vision_geometry
from vlm_dist.data.demo import COLOURS, SHAPES, SIZES, X_OF, make_scene, render
from vlm_dist.data.samples import ImageToTensor
from vlm_dist.model.vision import build_vision_tower

POS, KIND, COL, SZ = list(X_OF), ["none", *SHAPES], list(COLOURS), list(SIZES)


def batch(rng: random.Random, n: int, to_tensor: ImageToTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, S, S), labels (n, 9)): kind per position (0 = empty), colour and size per position."""
    xs, ys = [], []
    for _ in range(n):
        scene = make_scene(rng)
        buf = io.BytesIO()
        render(scene, rng, 64).save(buf, "JPEG", quality=90, subsampling=0)  # as demo-data writes them
        xs.append(to_tensor(buf.getvalue()))
        lab = [0, 0, 0] + [-100] * 6  # -100: no shape there, no colour / size target
        for s in scene:
            p = POS.index(s["position"])
            lab[p], lab[3 + p], lab[6 + p] = KIND.index(s["kind"]), COL.index(s["colour"]), SZ.index(s["size"])
        ys.append(lab)
    return torch.stack(xs), torch.tensor(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tower", default="vlm-demo-vit", help="open_clip model name (this package's or open_clip's)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--from-export", default=None, help="take the tower (and its name) from this `vlm-dist export` folder")
    p.add_argument("--freeze", action="store_true", help="train only the linear readout, not the tower")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.from_export:
        from vlm_dist.infer.load import load_exported

        vlm, _ = load_exported(args.from_export)
        args.tower = vlm.cfg.vision.model_name
        tower = vlm.vision.tower.float()
    else:
        tower = build_vision_tower(VisionConfig(model_name=args.tower, freeze=False))
    geo = vision_geometry(args.tower)
    if args.freeze:
        tower.requires_grad_(False)
    head = nn.Linear(geo["n_tokens"] * geo["width"], 3 * 4 + 3 * 4 + 3 * 2)  # position-specific readout
    opt = torch.optim.AdamW([p for p in [*tower.parameters(), *head.parameters()] if p.requires_grad], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    to_tensor = ImageToTensor(geo["image_size"])

    def forward(x):
        out = head(tower(x)[1].flatten(1))  # patch tokens (B, P, W) -> (B, 30)
        return out[:, :12].view(-1, 3, 4), out[:, 12:24].view(-1, 3, 4), out[:, 24:].view(-1, 3, 2)

    val = batch(random.Random("val"), 400, to_tensor)
    rng, t0 = random.Random("train"), time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(rng, args.batch, to_tensor)
        k, c, s = forward(x)
        loss = (F.cross_entropy(k.reshape(-1, 4), y[:, :3].reshape(-1)) + F.cross_entropy(c.reshape(-1, 4), y[:, 3:6].reshape(-1))
                + F.cross_entropy(s.reshape(-1, 2), y[:, 6:].reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            with torch.no_grad():
                k, c, s = forward(val[0])
            yv, present = val[1], val[1][:, 3:6] >= 0
            acc = lambda logits, lab: float(((logits.argmax(-1) == lab) & present).sum() / present.sum())  # noqa: E731
            print(json.dumps({"tower": args.from_export or args.tower, "frozen": args.freeze, "step": step, "loss": round(loss.item(), 3),
                              "kind": round(acc(k, yv[:, :3]), 3), "colour": round(acc(c, yv[:, 3:6]), 3),
                              "size": round(acc(s, yv[:, 6:]), 3), "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
