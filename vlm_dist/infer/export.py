"""DeepSpeed ZeRO checkpoint (any stage, any number of ranks) -> DIR/model.safetensors + DIR/config.json.

    vlm-dist export --ckpt runs/demo/checkpoints --tag best --out exports/demo

Consolidation is DeepSpeed's own zero_to_fp32 (get_fp32_state_dict_from_zero_checkpoint), which also
merges frozen parameters (the vision tower when frozen). The result is loaded strictly into a fresh
model, saved with safetensors' save_model (shared tensors stored once, re-tied on load), then read
back into another fresh model and compared tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlm_dist.config import ModelConfig
from vlm_dist.infer.load import EXPORT_FORMAT, ExportError, build_model, load_exported
from vlm_dist.text import get_tokenizer
from vlm_dist.train.checkpoint import RUN_CONFIG_FILE, incomplete_reason


def resolve_tag(ckpt_dir: Path, tag: str) -> str:
    if not ckpt_dir.is_dir():
        raise ExportError(f"{ckpt_dir} is not a directory; pass RUN/checkpoints of a training run")
    if tag == "latest":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise ExportError(f"{ckpt_dir} has no `latest` file: not a DeepSpeed checkpoints folder, or nothing saved yet")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
        raise ExportError(f"no checkpoint tag {tag!r} in {ckpt_dir}; available: {', '.join(have) or 'none'}")
    why = incomplete_reason(ckpt_dir / tag)  # the trainer's own check: every file its checkpoint.json lists, whole
    if why is not None:
        raise ExportError(f"{ckpt_dir / tag} is not a complete checkpoint: {why}; export another tag (--tag stepN, "
                          f"best), or resume training, which finishes or sets aside an interrupted save")
    return tag


def consolidate(ckpt_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """fp32 state dict of the whole model (tied and frozen weights included) and its model config.

    DeepSpeed's converter only recovers frozen parameters where ZeRO wrote them with the optimizer
    shards (stage >= 2); under stage 1 they live only in the module state dict of the model-states
    file, so any parameter the converter lacks is taken from there (read with weights_only=True).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg_file = ckpt_dir / tag / RUN_CONFIG_FILE
    if not cfg_file.is_file():
        raise ExportError(f"{cfg_file} is missing: this checkpoint was not written by vlm-dist's trainer")
    model_cfg = ModelConfig.model_validate(json.loads(cfg_file.read_text())["model"])
    state = {k.removeprefix("module."): v for k, v in
             get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}
    states = ckpt_dir / tag / "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_...
    if not states.is_file():
        states = ckpt_dir / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    module = torch.load(states, weights_only=True, map_location="cpu")["module"]
    for name, tensor in module.items():
        name = name.removeprefix("module.")
        if name not in state and tensor.numel() > 0:  # ZeRO-3 keeps empty placeholders here
            state[name] = tensor.float()
    return state, model_cfg


def export(ckpt_dir: str | Path, out: str | Path, tag: str = "latest", dtype: str = "fp32") -> Path:
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    tag = resolve_tag(ckpt_dir, tag)
    state, model_cfg = consolidate(ckpt_dir, tag)
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"checkpoint {ckpt_dir / tag} does not match its config: missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    save_export(model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]), out,
                source={"checkpoints": str(ckpt_dir.resolve()), "tag": tag})
    return out


def save_export(model: torch.nn.Module, out: Path, source: dict | None = None) -> None:
    """Write model.safetensors + config.json for `model` (a VLM), then verify by reloading."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # shared (tied) tensors stored once
    tok = get_tokenizer()
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.lm_head.weight.dtype]
    meta = {"format": EXPORT_FORMAT, "model": model.cfg.model_dump(mode="json"), "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "dtype": dtype, "source": source or {}}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    verify(out, model)


def verify(out: Path, expected: torch.nn.Module) -> None:
    """Reload the export into a fresh model (strict) and compare every tensor; check ties survived."""
    reloaded, _ = load_exported(out, dtype=expected.lm_head.weight.dtype)
    ref = expected.state_dict()
    got = reloaded.state_dict()
    if ref.keys() != got.keys():
        raise ExportError(f"export {out} reloads with different keys: {sorted(ref.keys() ^ got.keys())}")
    for k in ref:
        if not torch.equal(ref[k], got[k]):
            raise ExportError(f"export {out}: tensor {k} differs after reloading")
    if expected.cfg.tie_embeddings and reloaded.lm_head.weight is not reloaded.tok_emb.weight:
        raise ExportError(f"export {out}: tied embedding/LM-head weights came back untied")
