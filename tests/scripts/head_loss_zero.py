"""Run per rank (tests/test_heads_loss.py starts it): under each ZeRO stage given, fp32, the model's
memory-saving head loss (one chunked linear-cross-entropy) and the plain one (every head's logits at once,
tests/test_heads_loss.py::plain_loss) give the same loss and full gradients (safe_get_full_grad, a
collective) at step 1, and the same loss after an optimizer step.

Rank 0 prints one JSON line per stage: {"stage", "world", "loss_diff", "grad_diff", "step2_loss_diff", ...}.
    python tests/scripts/head_loss_zero.py 2 3
"""

import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests` is not installed

from tests.test_heads_loss import batch, plain_loss  # noqa: E402
from vlm_dist.config import load_config
from vlm_dist.model import VLM
from vlm_dist.model import loss as loss_module
from vlm_dist.train.engine import build_engine, init_distributed


class Plain(nn.Module):
    """The same model, scored with the reference loss."""

    def __init__(self, model: VLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, ids, targets):
        return {"loss": plain_loss(self.model, images, ids, targets)}


def run(stage: int, rank: int, plain: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    torch.manual_seed(0)
    model = VLM(load_config("tiny", ["model.n_future=4"]).model)
    engine = build_engine(Plain(model) if plain else model, ds)
    losses, grads = [], {}
    for step in range(2):
        images, ids, targets = batch(4, seed=10 * rank + step)
        loss = engine(images, ids, targets)["loss"]
        engine.backward(loss)
        losses.append(loss.item())
        if step == 0:
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    grads[name.removeprefix("model.")] = safe_get_full_grad(p).clone()
        engine.step()
    return losses, grads


def main(stages: list[int]) -> None:
    info = init_distributed()
    loss_module.CHUNK_ELEMENTS = 5 * 49408  # several checkpointed chunks per head
    for stage in stages:
        new_losses, new_grads = run(stage, info.rank, plain=False)
        ref_losses, ref_grads = run(stage, info.rank, plain=True)
        assert new_grads.keys() == ref_grads.keys()
        result = {"stage": stage, "world": info.world_size, "n_grads": len(new_grads),
                  "loss_diff": abs(new_losses[0] - ref_losses[0]),
                  "grad_diff": max((new_grads[k] - ref_grads[k]).abs().max().item() for k in new_grads),
                  "grad_max": max(g.abs().max().item() for g in ref_grads.values()),
                  "step2_loss_diff": abs(new_losses[1] - ref_losses[1])}
        if info.rank == 0:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]])
