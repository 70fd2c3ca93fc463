"""Run per rank (tests/test_export.py starts it): for each ZeRO stage given (N, or Nbf16: that stage in bf16),
build the engine on the tiny model, take two optimizer steps, save a checkpoint, export it (fp32), and compare

  - every exported tensor with the engine's fp32 master weight (safe_get_full_fp32_param, a collective);
  - the export with what DeepSpeed's own zero_to_fp32.py (copied into the checkpoint folder) writes;
  - the exported model's logits with the engine's on the same batch (fp32 runs);
  - in bf16, how many exported tensors differ from the module's bf16 weights (all trained ones should: the export
    takes the fp32 master weights, not the bf16 copies the module computes with).

Rank 0 prints one JSON line per stage: {"stage", "world", "max_weight_diff", "max_script_diff", ...}.
    python tests/scripts/export_check.py OUT_DIR 1 2 3 2bf16
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from vlm_dist.config import load_config
from vlm_dist.infer.export import export
from vlm_dist.infer.load import load_exported
from vlm_dist.model import VLM
from vlm_dist.train import checkpoint as ckpt
from vlm_dist.train.dist import barrier
from vlm_dist.train.engine import Engine, init_distributed


def batch(seed: int, B: int = 4, T: int = 12, n_future: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49408, (B, T), generator=g)
    targets = torch.randint(0, 49408, (B, n_future, T), generator=g)
    targets[:, :, :3] = -100
    return torch.randn(B, 3, 32, 32, generator=g), ids, targets


def main(out: Path, specs: list[str]) -> None:
    info = init_distributed()
    cfg = load_config("tiny", ["model.vision.freeze=true"])  # a frozen tower must come out too
    for spec in specs:
        stage, bf16 = int(spec[0]), spec.endswith("bf16")
        ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
        torch.manual_seed(0)
        model = VLM(cfg.model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}  # never change
        engine = Engine(model, ds)
        for step in range(2):
            images, ids, targets = batch(100 * info.rank + step)
            engine.backward(engine(images, ids, targets)["loss"])
            engine.step()
        ckpt_dir = out / f"zero{spec}_w{info.world_size}"
        ckpt.save(engine, ckpt_dir, "step2", ckpt.TrainState(step=2), cfg.model_dump(mode="json"),
                  {"world_size": info.world_size}, info.world_size)
        master = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()  # all ranks
                  if p.requires_grad}
        module = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()  # bf16 in a bf16 run
                  if p.requires_grad and p.numel() > 0}  # (ZeRO-3 partitions: empty here, skipped)
        assert frozen and not frozen.keys() & master.keys()
        # frozen weights have no fp32 master: the module holds them in the run's precision, and so does the export
        master.update({n: w.to(torch.bfloat16).float() if bf16 else w for n, w in frozen.items()})
        images, ids, targets = batch(999)
        engine.eval()
        with torch.no_grad():
            engine_logits = engine(images, ids, targets, return_logits=True)["logits"]
        if info.rank == 0:
            export(ckpt_dir, out / f"export{spec}", tag="step2")
            model, _ = load_exported(out / f"export{spec}")
            exported = model.state_dict()
            weight_diff = max((exported[n] - w).abs().max().item() for n, w in master.items())
            script_out = out / f"script{spec}"
            subprocess.run([sys.executable, str(ckpt_dir / "zero_to_fp32.py"), str(ckpt_dir), str(script_out),
                            "--tag", "step2"], check=True, capture_output=True)
            theirs = torch.load(script_out / "pytorch_model.bin", weights_only=True)
            theirs = {k.removeprefix("module."): v for k, v in theirs.items()}
            script_diff = max((exported[k] - v).abs().max().item() for k, v in theirs.items())
            with torch.no_grad():
                logits = model(images, ids, targets, return_logits=True)["logits"]
            print(json.dumps({
                "stage": spec, "world": info.world_size, "max_weight_diff": weight_diff,
                "module_weights": len(module), "equal_to_module": sum(torch.equal(exported[n], w) for n, w in module.items()),
                "max_script_diff": script_diff, "script_keys_missing": sorted(set(exported) - set(theirs) - {"lm_head.weight"}),
                "max_logit_diff": (logits - engine_logits).abs().max().item(),
                "tied": model.lm_head.weight is model.tok_emb.weight,
                "n_params": len(master), "n_frozen": len(frozen)}), flush=True)
        barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
