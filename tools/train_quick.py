"""Train a demo-preset model briefly with plain PyTorch on in-memory demo scenes, and export it.

    python tools/train_quick.py --out runs/quick4 --n-future 4 --steps 600
    python tools/bench_decode.py --model runs/quick4 --scenes 32

A stand-in for the DeepSpeed demo run (tools/run_demo.sh) where that is too slow: same model preset,
same synthetic task (captions + one-word Q&A, rendered at the tower's 32 px), AdamW with warmup and
cosine decay, one process. It prints the validation loss of every head at the end (next-token loss
is the one to compare across --n-future settings) and writes an export folder that `vlm-dist
generate/eval` and tools/bench_decode.py load.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def demo_samples(n: int, seed: int, side: int = 32) -> list[tuple[torch.Tensor, str, list[tuple[str, str]]]]:
    """n scenes: (image tensor in the model's input transform, caption, [(question, answer)])."""
    from vlm_dist.data.demo import caption, make_scene, questions, render
    from vlm_dist.data.samples import ImageToTensor

    rng = random.Random(seed)
    to_tensor = ImageToTensor(side)
    out = []
    for _ in range(n):
        scene = make_scene(rng)
        buf = io.BytesIO()
        render(scene, rng, side).save(buf, format="JPEG", quality=90)
        out.append((to_tensor(buf.getvalue()), caption(scene), questions(scene)))
    return out


def batch_of(samples, idx: list[int], n_future: int, max_len: int, rng: random.Random, qa_fraction: float = 0.5):
    from vlm_dist.text import build_example, collate_examples, get_tokenizer, make_targets

    tok = get_tokenizer()
    examples = []
    for i in idx:
        _, cap, qa = samples[i]
        if rng.random() < qa_fraction:
            q, a = rng.choice(qa)
            examples.append(build_example(tok, a, max_len, question=q))
        else:
            examples.append(build_example(tok, cap, max_len))
    tokens, mask = collate_examples(examples, tok.pad_id)
    inputs, targets = make_targets(tokens, mask, n_future)
    return torch.stack([samples[i][0] for i in idx]), inputs, targets


def train(n_future: int, steps: int, batch: int = 32, lr: float = 1e-3, n_train: int = 2000, n_val: int = 128,
          seed: int = 0, log=print):
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM

    cfg = load_config("demo", [f"model.n_future={n_future}"])
    torch.manual_seed(seed)
    model = VLM(cfg.model)
    train_set, val_set = demo_samples(n_train, seed), demo_samples(n_val, seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        images, inputs, targets = batch_of(train_set, rng.sample(range(n_train), batch), n_future,
                                           cfg.data.max_text_len, rng)
        loss = model(images, inputs, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    vrng = random.Random(seed + 2)
    with torch.no_grad():
        images, inputs, targets = batch_of(val_set, list(range(n_val)), n_future, cfg.data.max_text_len, vrng)
        head_losses = model(images, inputs, targets)["head_losses"].tolist()
    log(f"n_future={n_future}, {steps} steps: val loss per head {[round(x, 4) for x in head_losses]}")
    return model, head_losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--n-future", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    from vlm_dist.infer.export import save_export

    model, _ = train(args.n_future, args.steps, args.batch, args.lr)
    save_export(model, Path(args.out), {"trained_by": "tools/train_quick.py", "steps": args.steps})
    print(f"exported -> {args.out}")


if __name__ == "__main__":
    main()
