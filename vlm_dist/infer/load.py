"""Rebuild a model from an export directory (model.safetensors + config.json) without DeepSpeed.

    model, cfg = load_exported("exports/demo", device=pick_device("auto"))   # vlm_dist.devices: the first GPU if any
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlm_dist.config import ModelConfig
from vlm_dist.text import get_tokenizer

EXPORT_FORMAT = "vlm-dist-export/1"


class ExportError(ValueError):
    """The directory is not a vlm-dist export, or its files disagree with each other."""


def read_export_config(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d} {'is not a directory' if d.exists() else 'does not exist'}; pass the --out folder "
                          f"of `vlm-dist export`")
    path = d / "config.json"
    if not path.is_file() or not (d / "model.safetensors").is_file():
        if (d / "checkpoints").is_dir():  # a training run's folder: export it beside its checkpoints
            raise ExportError(f"{d} is a training run, not an export: `vlm-dist export --ckpt {d / 'checkpoints'} --out "
                              f"{d / 'export'}`, then pass --model {d / 'export'}")
        raise ExportError(f"{d} is not a vlm-dist export (needs config.json and model.safetensors); "
                          f"create one with `vlm-dist export --ckpt RUN/checkpoints --out {d}`")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}): export the checkpoint again") from err
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r} is not "
                          f"{EXPORT_FORMAT!r}: export the checkpoint again")
    tok = get_tokenizer()
    if meta.get("tokenizer") != tok.name or meta.get("vocab_size") != tok.vocab_size:
        raise ExportError(f"{path}: exported with tokenizer {meta.get('tokenizer')} ({meta.get('vocab_size')} ids), "
                          f"this install has {tok.name} ({tok.vocab_size} ids)")
    return meta


def build_model(model_cfg: ModelConfig):
    """The architecture alone: no pretrained-weight lookup (the export carries every weight)."""
    from vlm_dist.model import VLM

    cfg = model_cfg.model_copy(update={"vision": model_cfg.vision.model_copy(update={"pretrained": None})})
    return VLM(cfg)


def load_exported(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    from safetensors.torch import load_model

    from pydantic import ValidationError
    from safetensors import SafetensorError

    meta = read_export_config(directory)
    weights = Path(directory) / "model.safetensors"
    if not isinstance(meta.get("model"), dict):
        raise ExportError(f"{Path(directory) / 'config.json'} has no \"model\" section: export the checkpoint again")
    meta["model"].setdefault("vision", {})["allow_random_frozen"] = True  # the export carries the tower's weights
    meta["model"]["vision"].setdefault("quick_gelu", False)  # exports older than the field never forced QuickGELU
    meta["model"]["compile"] = False  # a training setting: decoding runs eager, and a few images never repay compiling
    try:
        cfg = ModelConfig.model_validate(meta["model"])
    except ValidationError as err:
        raise ExportError(f"{Path(directory) / 'config.json'}: its model section is not valid ({err})") from err
    model = build_model(cfg)
    try:
        load_model(model, str(weights), strict=True)  # re-ties shared weights
    except (SafetensorError, OSError) as err:  # cut short or overwritten
        raise ExportError(f"{weights} cannot be read ({err}): copy or export it again") from err
    except RuntimeError as err:  # missing, unexpected or misshapen tensors (torch's message lists them)
        raise ExportError(f"{weights} does not hold the weights its config.json describes: {str(err)[:600]} "
                          f"(the two files come from different exports?): export the checkpoint again") from err
    model.to(device=device, dtype=dtype or model.lm_head.weight.dtype).eval()
    return model, cfg
